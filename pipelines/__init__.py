"""Kubeflow pipeline definitions of sermtl and the script that runs them on this machine."""
