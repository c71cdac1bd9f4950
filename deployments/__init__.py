"""Ray Serve deployments: thin wrappers over collab/."""
