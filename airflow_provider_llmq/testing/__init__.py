"""What llmq's own tests, demo and benchmarks use, shipped so that users can test their DAGs the same
way: an OpenAI / Azure OpenAI compatible mock server over TLS. Needs the ``testing`` extra (trustme)."""
