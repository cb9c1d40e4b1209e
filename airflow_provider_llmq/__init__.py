"""llmq: query an LLM for every row of a Spark DataFrame, from Airflow."""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"


def get_provider_info() -> dict[str, Any]:
    """Provider metadata read by Airflow (entry point group ``apache_airflow_provider``).

    The connection form is declared here (``conn-fields`` / ``ui-field-behaviour``): the Airflow 3.3
    UI reads only this and never imports the hook for it.
    """
    string = {"type": ["string", "null"]}
    return {
        "package-name": "airflow-provider-llmq",
        "name": "LLM Query (llmq)",
        "description": "Query OpenAI / Azure OpenAI chat completions for every row of a Spark DataFrame.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "LLM Query",
                "external-doc-url": "https://platform.openai.com/docs/api-reference/chat",
                "tags": ["ai", "software"],
            }
        ],
        "hooks": [
            {
                "integration-name": "LLM Query",
                "python-modules": ["airflow_provider_llmq.hooks.llmq"],
            }
        ],
        "operators": [
            {
                "integration-name": "LLM Query",
                "python-modules": [
                    "airflow_provider_llmq.operators.llmq",
                    "airflow_provider_llmq.operators.batch_api",
                ],
            }
        ],
        "triggers": [
            {
                "integration-name": "LLM Query",
                "python-modules": ["airflow_provider_llmq.triggers.batch_api"],
            }
        ],
        "task-decorators": [
            {"name": "llmq", "class-name": "airflow_provider_llmq.decorators.llmq.llmq_task"},
        ],
        "connection-types": [
            {
                "connection-type": "llmq",
                "hook-class-name": "airflow_provider_llmq.hooks.llmq.LLMQueryHook",
                "hook-name": "LLM Query (OpenAI / Azure OpenAI)",
                "conn-fields": {
                    "api_type": {
                        "label": "API type",
                        # no None in the enum: the UI would show a literal "null" choice and prefill it
                        "schema": {"type": ["string", "null"], "enum": ["azure", "azure_v1", "openai"]},
                        "description": "azure: api-key header, deployment in the URL, api-version; "
                        "azure_v1: Azure's /openai/v1 API (api-key, deployment as the model, no "
                        "api-version); openai: Bearer token, a bare host means host/v1. Left empty: "
                        "azure_v1 for a host ending in /openai/v1, azure for an *.openai.azure.com host "
                        "or with a deployment, else openai.",
                    },
                    "api_version": {
                        "label": "API version (Azure)",
                        # no default: the UI would prefill it, and Azure's v1 API takes no dated version
                        "schema": string,
                        "description": "Azure OpenAI api-version query parameter, e.g. 2024-06-01; "
                        "empty: 2024-06-01 (azure), none (azure_v1).",
                    },
                    "deployment": {
                        "label": "Deployment (Azure)",
                        "schema": string,
                        "description": "The Azure deployment name, sent in the URL (Azure's model name is "
                        "the deployment's).",
                    },
                    "model": {
                        "label": "Model (OpenAI)",
                        "schema": string,
                        "description": "The model sent in the request body, e.g. gpt-4o-mini; used when "
                        "no deployment is set. The operators' model argument overrides both.",
                    },
                    "ca_cert": {
                        "label": "CA certificate",
                        "schema": string,
                        "description": "CA bundle path, or the PEM text, for a self-signed or corporate CA.",
                    },
                    "verify": {
                        "label": "Verify TLS",
                        "schema": {"type": ["boolean", "null"], "default": True},
                        "description": "Turn off only for a throwaway test endpoint: a warning is logged.",
                    },
                    "timeout": {
                        "label": "Request timeout (s)",
                        "schema": {"type": ["number", "null"], "default": 60},
                        "description": "A deadline for the whole request (connect, headers, body); the "
                        "operators' request_timeout overrides it.",
                    },
                    "proxy": {
                        "label": "Proxy",
                        "schema": string,
                        "description": "http(s)://[user:password@]host:port; wins over HTTPS_PROXY and "
                        "NO_PROXY. Its credentials are masked.",
                    },
                    "auth_type": {
                        "label": "Authentication",
                        "schema": {"type": ["string", "null"], "enum": ["api_key", "entra_id"]},
                        "description": "api_key (the password) or entra_id: Entra ID tokens, sent as "
                        "Authorization: Bearer (needs the azure extra). Left empty: api_key.",
                    },
                    "tenant_id": {
                        "label": "Tenant ID (Entra ID)",
                        "schema": string,
                        "description": "The directory (tenant) id of the service principal.",
                    },
                    "client_id": {
                        "label": "Client ID (Entra ID)",
                        "schema": string,
                        "description": "The service principal's application id; without a secret or "
                        "certificate, the user-assigned managed identity DefaultAzureCredential uses.",
                    },
                    "client_secret": {
                        "label": "Client secret (Entra ID)",
                        "schema": {**string, "format": "password"},
                        "description": "The service principal's secret. Without a secret or a "
                        "certificate: DefaultAzureCredential (managed identity, workload identity, "
                        "AZURE_* environment variables, az CLI).",
                    },
                    "certificate_path": {
                        "label": "Client certificate path (Entra ID)",
                        "schema": string,
                        "description": "A PEM file with the service principal's certificate and its "
                        "private key, instead of a secret.",
                    },
                    "certificate_password": {
                        "label": "Certificate password (Entra ID)",
                        "schema": {**string, "format": "password"},
                        "description": "The password of the certificate's encrypted private key; "
                        "empty for an unencrypted key.",
                    },
                    "authority_host": {
                        "label": "Authority host (Entra ID)",
                        "schema": string,
                        "description": "e.g. https://login.microsoftonline.us for a sovereign cloud; "
                        "empty: AZURE_AUTHORITY_HOST, else the public cloud.",
                    },
                    "scope": {
                        "label": "Token scope (Entra ID)",
                        "schema": string,
                        "description": "Empty: https://cognitiveservices.azure.com/.default",
                    },
                    "authority_ca_cert": {
                        "label": "Authority CA certificate (Entra ID)",
                        "schema": string,
                        "description": "CA bundle path or PEM text for a private authority's TLS.",
                    },
                    "headers": {
                        "label": "Extra headers (JSON)",
                        "schema": string,
                        "description": 'A JSON object of static headers, e.g. {"Ocp-Apim-Subscription-Key": '
                        '"..."}; the values are treated as secrets.',
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"host": "API base URL", "password": "API key"},
                    "placeholders": {
                        "host": "https://my-resource.openai.azure.com[/openai/v1] or https://api.openai.com/v1",
                        "password": "the API key (sent only in a header)",
                        "extra": '{"api_type": "azure", "deployment": "gpt-4o-mini"}',
                    },
                },
            }
        ],
    }
