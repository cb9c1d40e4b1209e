"""Where a request goes and with which credential: the endpoint, its API form, Entra ID tokens, the secrets
scrubbed from every message."""
