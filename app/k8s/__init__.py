"""Kubernetes for Crescent: render the kustomize overlays in k8s/ (real kustomize, `kubectl kustomize`) with a
run's parameters, check them, and apply them with the `kubernetes` client's DynamicClient (server-side apply).
`crescent k8s ...` is the command line."""
