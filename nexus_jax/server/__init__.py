"""The gRPC server, its interceptors, sessions and metrics, and the client."""

TOKEN_ENV = "NEXUS_AUTH_TOKEN"  # the environment variable the commands read the bearer token from
