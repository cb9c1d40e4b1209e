"""The API forms an endpoint can speak: where its paths sit under the base URL and how a key is sent.

One ``ApiForm`` per form; :class:`~.endpoint.EndpointConfig` and the Batch API client ask the form,
never the ``api_type`` string. The rules for the base URL, one per form:

- ``openai`` (OpenAI, and gateways that speak its API: LiteLLM, vLLM, Ollama...): the base is used
  as given, as openai-python uses ``base_url``, except that a bare host (no path) means
  ``<host>/v1``, where every one of them serves the API: ``https://api.openai.com`` and
  ``http://localhost:4000`` reach ``/v1/chat/completions``. A gateway with its own path
  (``https://gw.example.com/llm``) is taken as it is. Key as ``Authorization: Bearer``.
- ``azure`` (Azure OpenAI's dated API): the resource URL; the deployment is in the path and
  ``api-version`` in the query. A base that ends in ``/openai`` or ``/openai/v1`` would double the
  path (a 404 at the first row), so it is refused with the way out. Key as ``api-key``.
- ``azure_v1`` (Azure OpenAI's v1 API): the resource URL, with or without ``/openai/v1``; OpenAI's
  paths under ``/openai/v1``, the deployment as the body's ``model``, no ``api-version`` (only
  ``preview`` / ``latest`` are sent, when asked for). Key as ``api-key``.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from airflow_provider_llmq.core.errors import LLMQueryConfigError

DEFAULT_AZURE_API_VERSION = "2024-06-01"
AZURE_V1_PATH = "/openai/v1"
_V1_VERSIONS = ("preview", "latest")  # the only api-version values Azure's v1 API takes


def _path(base: str) -> str:
    return urlsplit(base).path.rstrip("/")


def _needs_deployment(model: str | None) -> str:
    if not model:
        raise LLMQueryConfigError(
            "Azure OpenAI needs a deployment name: set extra 'deployment' on the connection or pass model=..."
        )
    return model


class ApiForm:
    """What differs between the forms: the API root, the chat URL, the key header, the body's model."""

    #: the body carries the model (OpenAI, Azure v1); the dated Azure API takes it from the path
    model_in_body = True

    def check(self, base: str, api_version: str | None) -> None:
        """Refuses a base URL or setting that could only end in a 404 or a 400 at the first row."""

    def root(self, base: str) -> str:
        """The URL that ``/chat/completions``, ``/files`` and ``/batches`` are appended to."""
        raise NotImplementedError

    def chat_url(self, base: str, model: str | None, api_version: str | None) -> str:
        return f"{self.root(base)}/chat/completions"

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def limit_param(self, api_version: str | None) -> str:
        """The body field of a completion limit llmq sets itself (OpenAI's reasoning models refuse
        ``max_tokens``)."""
        return "max_completion_tokens"


class OpenAIForm(ApiForm):
    def root(self, base: str) -> str:
        return base if _path(base) else f"{base}/v1"


class AzureForm(ApiForm):
    model_in_body = False

    def check(self, base: str, api_version: str | None) -> None:
        path = _path(base)
        if path.endswith(AZURE_V1_PATH):
            raise LLMQueryConfigError(
                f"the host ends in {AZURE_V1_PATH}, Azure's v1 API: set extra api_type to azure_v1 "
                "(or leave api_type empty), or remove the path for the dated API (api_version)"
            )
        if path.endswith("/openai"):
            raise LLMQueryConfigError(
                "the host ends in /openai, which llmq adds itself: give the resource URL "
                "(https://<resource>.openai.azure.com)"
            )

    def root(self, base: str) -> str:
        return f"{base}/openai"

    def chat_url(self, base: str, model: str | None, api_version: str | None) -> str:
        deployment = quote(_needs_deployment(model), safe="")
        version = quote(api_version or DEFAULT_AZURE_API_VERSION, safe="")
        return f"{self.root(base)}/deployments/{deployment}/chat/completions?api-version={version}"

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"api-key": key}

    def limit_param(self, api_version: str | None) -> str:
        # api-versions before this one know only max_tokens
        version = api_version or DEFAULT_AZURE_API_VERSION
        return "max_completion_tokens" if version >= "2024-10-21" else "max_tokens"


class AzureV1Form(ApiForm):
    def check(self, base: str, api_version: str | None) -> None:
        if api_version and api_version not in _V1_VERSIONS:
            raise LLMQueryConfigError(
                f"Azure's v1 API takes no dated api_version (got {api_version!r}): remove it, or "
                f"use one of {_V1_VERSIONS}, or set api_type to azure for the dated API"
            )

    def root(self, base: str) -> str:
        return base if _path(base).endswith(AZURE_V1_PATH) else f"{base}{AZURE_V1_PATH}"

    def chat_url(self, base: str, model: str | None, api_version: str | None) -> str:
        _needs_deployment(model)  # the body's model: a request without one is a 400 on every row
        url = f"{self.root(base)}/chat/completions"
        return f"{url}?api-version={api_version}" if api_version else url

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"api-key": key}


FORMS: dict[str, ApiForm] = {"azure": AzureForm(), "azure_v1": AzureV1Form(), "openai": OpenAIForm()}
API_TYPES: tuple[str, ...] = tuple(FORMS)


def guess_api_type(host: str, deployment: bool) -> str:
    """Without an explicit api_type: Azure's v1 API for a ``/openai/v1`` base, the dated Azure API
    for an Azure host or a deployment name, else OpenAI."""
    if "://" not in host:
        host = f"https://{host}"
    if _path(host).endswith(AZURE_V1_PATH):
        return "azure_v1"
    if ".openai.azure.com" in host or ".cognitiveservices.azure.com" in host or deployment:
        return "azure"
    return "openai"
