"""Test helpers: simulated AnnData, reference implementations of the models, random op inputs."""
