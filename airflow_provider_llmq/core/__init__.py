"""The Airflow-free, Spark-free core: endpoint, request body, limits, retries, the two clients and the
four query methods. Usable from plain Python."""
