"""Ray Serve deployments: thin wrappers over collab/ (issue 4)."""
