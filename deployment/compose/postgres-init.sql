-- Runs once, when the PostgreSQL volume is first created: MLflow gets a database of its own beside the
-- fleet manager's (POSTGRES_DB=edgefleet).
CREATE DATABASE mlflow OWNER edgefleet;
