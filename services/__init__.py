"""Ray Serve deployments (scorer, sampler) and the HTTP ingress, thin around `common`."""
