"""Kubernetes manifests for model specs: pure functions (manifests, kustomize trees)."""
