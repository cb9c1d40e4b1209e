"""Who may call a route: the key or token, the API version the route's form takes, a deployment that
exists; the chat, models and batch routes all ask it first."""

from __future__ import annotations

from aiohttp import web

from .responses import error
from .state import MockState, is_azure_v1


def unauthorised() -> web.Response:
    return error(
        401,
        "invalid_api_key",
        "Incorrect API key provided or missing credentials. "
        "You can find your API key in the resource's Keys and Endpoint page.",
        type="invalid_request_error",
    )


def check_access(request: web.Request, st: MockState, azure: bool) -> web.Response | None:
    """Header / URL checks shared by chat and models routes; None when the request may proceed."""
    allowed = st.authorised(request, azure)
    if allowed == "expired":
        st.expired_tokens += 1
        return error(401, "401", "Access token has expired or is not yet valid.")
    if not allowed:
        return unauthorised()
    if is_azure_v1(request):
        # the v1 API has no dated versions: Azure refuses one (only preview / latest are taken)
        if request.query.get("api-version", "latest") not in ("preview", "latest"):
            return error(
                400,
                "BadRequest",
                "API version not supported on the v1 API: remove the api-version query.",
                type="invalid_request_error",
            )
    elif azure and not request.query.get("api-version"):
        return error(
            400,
            "invalid_api_version",
            "Missing the api-version query parameter.",
            type="invalid_request_error",
        )
    deployment = request.match_info.get("deployment")
    deployments = st.config.deployments
    if deployment is not None and deployments and deployment not in deployments:
        return error(
            404,
            "DeploymentNotFound",
            "The API deployment for this resource does not exist. "
            "If you created the deployment within the last 5 minutes, please wait a moment.",
        )
    return None
