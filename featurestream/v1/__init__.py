"""Generated gRPC code of proto/featurestream/v1 (scripts/gen_proto.py); do not edit."""
