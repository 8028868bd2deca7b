"""Credentials masked out of any text: one redaction for every place an address can appear (messages, logs, JSON
summaries, MLflow params and tags, Ray job entrypoints), used by the pipeline and the jobs alike."""

from __future__ import annotations

import re

MASK = "***"

# Names of variables and of URL or connection-string parameters that hold secrets: *_API_KEY, *AUTH*, *TOKEN*,
# X-Amz-Signature, AccountKey, Password, a DSN, a connection string, a webhook (whose path is the secret), ...
_SECRET_NAME = re.compile(
    r"secret|token|passw|credential|auth|private|key|signature|cookie|session|connection|webhook"
    r"|(?:^|[_.-])(?:pwd|pass|dsn|sas|sig|conn|creds)(?:$|[_.-])",
    re.IGNORECASE,
)
# scheme://user:password@ or scheme://user@ (a lone user name is often a token); the password runs to the last @
# before the path, as an unescaped @ in a password would.
_USER_INFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^/?#@\s:]*)(?P<password>:[^/?#\s]*)?@",
                        re.IGNORECASE)
_PARAMETER = re.compile(r"(?P<name>[\w.-]+)=(?P<value>[^&;\s\"',]+)")


def redact(text: str) -> str:
    """`text` (a URI, a connection string, an error message) with the user info of every URL and the value of every
    secret-looking `name=value` parameter replaced by MASK."""

    def user_info(match: re.Match) -> str:
        user = f"{match['user']}:{MASK}" if match["password"] is not None else MASK
        return f"{match['scheme']}{user}@"

    def parameter(match: re.Match) -> str:
        return f"{match['name']}={MASK}" if _SECRET_NAME.search(match["name"]) else match[0]

    return _PARAMETER.sub(parameter, _USER_INFO.sub(user_info, text))


def carries_credentials(value: str) -> bool:
    return redact(value) != value


def looks_secret(name: str) -> bool:
    """Whether a variable's name says it holds a credential."""
    return bool(_SECRET_NAME.search(name))
