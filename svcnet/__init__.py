"""svcnet: service networking and discovery for Kubernetes-style clusters."""

__version__ = "0.1.0"
