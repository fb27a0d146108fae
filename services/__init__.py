"""Ray Serve deployments (scorer, sampler) and the HTTP ingress, thin around `common`."""

from services.local_ray import keep_replica_grpc_on_loopback

# A Serve replica imports this package when it loads our deployment classes, before it opens its
# inter-deployment gRPC server: on a loopback-only node that server must stay on loopback too.
keep_replica_grpc_on_loopback()
