"""The Spark layer: no Airflow import, one job per module.

``source`` reads and validates the prompts' table; ``plan`` materializes it with stable ids and
request keys and says what is still to ask; ``checkpoint`` keeps what was answered; a placement
(``placements.driver`` or ``placements.udf``) asks; ``sink`` joins the answers back and writes;
``summary`` counts what was written. ``schema`` declares the result columns once for all of them.
"""
