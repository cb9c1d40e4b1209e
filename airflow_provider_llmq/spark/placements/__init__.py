"""Where requests are sent from. A placement takes a :class:`Work` and returns when every pending
request of it is settled in the checkpoint; a new placement (executors, a Batch API) is one new
module here."""

from airflow_provider_llmq.spark.placements.base import Placement, PlacementStopped, Work
from airflow_provider_llmq.spark.placements.driver import DriverPlacement
from airflow_provider_llmq.spark.placements.executors import ExecutorPlacement
from airflow_provider_llmq.spark.placements.udf import UDFPlacement

__all__ = ["DriverPlacement", "ExecutorPlacement", "Placement", "PlacementStopped", "UDFPlacement", "Work"]
