"""Where studies and models go: MLflow tracking, the registry (gate, promotion, rollback), the served
model, provenance, and the Kubeflow client."""
