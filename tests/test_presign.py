"""Result URLs signed with a role's credentials (pure logic: the real path, URLs fetched from the S3 server, is in
tests/test_pipeline.py)."""

from __future__ import annotations

import datetime
import itertools
import time
from urllib.parse import parse_qs, urlsplit

from botocore.credentials import RefreshableCredentials

from bucketlens.settings import Settings
from index_service.presign import SESSION_CACHE_S, Presigner


def role_credentials() -> RefreshableCredentials:
    """A role's credentials so close to their expiry that botocore renews them at every read of a part."""
    sets = itertools.count(1)

    def renew() -> dict[str, str]:
        n = next(sets)
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=60)
        return {"access_key": f"AKID{n}", "secret_key": f"secret{n}", "token": f"token{n}",
                "expiry_time": expiry.isoformat()}

    return RefreshableCredentials.create_from_metadata(renew(), renew, "assume-role")


def test_a_url_signed_with_a_session_token_is_one_consistent_set_and_kept_briefly() -> None:
    """Signing read the key id, secret and token one by one, so a renewal in between mixed two sets; and a URL
    was cached for half its hour, past the session token that signed it (an independent review)."""
    presigner = Presigner(Settings(s3_access_key="unused", s3_secret_key="unused"))
    presigner.credentials = role_credentials()
    url = presigner.url("images", "cat.jpg")
    query = parse_qs(urlsplit(url).query)
    key_id = query["X-Amz-Credential"][0].split("/")[0]
    assert query["X-Amz-Security-Token"] == [key_id.replace("AKID", "token")], url
    (expires, cached), = presigner._cache.values()
    assert cached == url and expires <= time.monotonic() + SESSION_CACHE_S
    plain = Presigner(Settings(s3_access_key="AKID", s3_secret_key="secret"))
    plain.url("images", "cat.jpg")
    (expires, _), = plain._cache.values()
    assert expires > time.monotonic() + plain.expires_s / 2 - 60  # keys without a token: half the URL's life
