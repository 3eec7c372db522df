"""Generated gRPC stubs of nexus.proto (see its header for how they are made)."""
