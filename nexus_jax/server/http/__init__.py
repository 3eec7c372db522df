"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over the same AsyncLLM as the gRPC server.

protocol.py: the request bodies and how they map to SamplingParams; errors.py: OpenAI's error schema;
generation.py: running a request's prompts on the engine, its admission slots and its abort on disconnect;
responses.py: response and stream-chunk bodies; routes.py: the endpoints; server.py: uvicorn on a socket of its own.
"""
