-- The MLflow basic-auth app keeps users and permissions in its own database (basic_auth.ini: database_uri).
CREATE DATABASE mlflow_auth;
