"""Triggers: what a deferred llmq task waits on in the triggerer."""

from airflow_provider_llmq.triggers.batch_api import LLMQueryBatchTrigger

__all__ = ["LLMQueryBatchTrigger"]
