"""API key from the Bearer header or the websocket key subprotocol; browser Origin rules (no Origin ok, allow-list,
loopback pages on a loopback server, same-origin only for hosts DNS rebinding cannot fake)."""

from starlette.datastructures import Headers

from omnivox.server.security import check_api_key, is_loopback, origin_allowed, select_subprotocol


def test_open_server_needs_no_key():
    assert check_api_key({}, None, None)
    assert check_api_key({"Authorization": "Bearer anything"}, ["realtime"], None)


def test_bearer_header_any_case():
    assert check_api_key({"Authorization": "Bearer s3cret"}, None, "s3cret")
    assert check_api_key({"authorization": "bearer s3cret"}, None, "s3cret")
    assert check_api_key(Headers(raw=[(b"authorization", b"Bearer s3cret")]), [], "s3cret")
    assert check_api_key([(b"Authorization", b"Bearer  s3cret ")], [], "s3cret")


def test_wrong_missing_or_malformed_key_is_refused():
    assert not check_api_key({}, None, "s3cret")
    assert not check_api_key({"Authorization": "Bearer wrong"}, None, "s3cret")
    assert not check_api_key({"Authorization": "Bearer s3cre"}, None, "s3cret")      # prefix
    assert not check_api_key({"Authorization": "Bearer s3cretX"}, None, "s3cret")    # longer
    assert not check_api_key({"Authorization": "Basic s3cret"}, None, "s3cret")      # other scheme
    assert not check_api_key({"Authorization": "s3cret"}, None, "s3cret")
    assert not check_api_key({"Authorization": "Bearer "}, None, "s3cret")
    assert not check_api_key({}, ["realtime", "openai-insecure-api-key.wrong"], "s3cret")
    assert not check_api_key({}, ["s3cret"], "s3cret")                                # not the key subprotocol


def test_key_subprotocol_and_non_ascii_keys():
    assert check_api_key({}, ["realtime", "openai-insecure-api-key.s3cret"], "s3cret")
    assert check_api_key({"Authorization": "Bearer wrong"}, ["openai-insecure-api-key.s3cret"], "s3cret")
    assert check_api_key({"Authorization": "Bearer clé"}, None, "clé")
    assert not check_api_key({"Authorization": "Bearer cle"}, None, "clé")


def test_select_subprotocol_never_echoes_the_key():
    assert select_subprotocol(["openai-insecure-api-key.k", "realtime"]) == "realtime"
    assert select_subprotocol(["openai-insecure-api-key.k"]) is None
    assert select_subprotocol(None) is None


def test_non_browser_clients_have_no_origin_and_pass():
    assert origin_allowed(None, [], "0.0.0.0")
    assert origin_allowed("", None, "0.0.0.0")


def test_loopback_pages_on_a_loopback_server():
    for bind in ("127.0.0.1", "localhost", "::1"):
        assert origin_allowed("http://localhost:8000", [], bind)
        assert origin_allowed("http://127.0.0.1:3000", [], bind)
        assert origin_allowed("http://[::1]:8000", [], bind)
    assert not origin_allowed("http://localhost:8000", [], "0.0.0.0", request_host="myhost.lan:8000")
    assert not origin_allowed("https://evil.example", [], "127.0.0.1")
    assert not origin_allowed("https://evil.example", [], "127.0.0.1", request_host="127.0.0.1:8000")


def test_allow_list_matches_scheme_host_and_port_exactly():
    allow = ["https://app.example.com", "http://10.0.0.5:8080/"]
    assert origin_allowed("https://app.example.com", allow, "0.0.0.0")
    assert origin_allowed("https://APP.example.com:443", allow, "0.0.0.0")     # default port, case
    assert origin_allowed("http://10.0.0.5:8080", allow, "0.0.0.0")
    assert not origin_allowed("http://app.example.com", allow, "0.0.0.0")      # scheme
    assert not origin_allowed("https://app.example.com:8443", allow, "0.0.0.0")  # port
    assert not origin_allowed("https://app.example.com.evil.example", allow, "0.0.0.0")
    assert not origin_allowed("https://evil.example", allow, "0.0.0.0")
    assert origin_allowed("https://anything.example", ["*"], "0.0.0.0")


def test_same_origin_only_for_hosts_that_cannot_be_rebound():
    # an IP literal the page was loaded from: same origin is enough
    assert origin_allowed("http://192.168.1.5:8000", [], "0.0.0.0", request_host="192.168.1.5:8000")
    assert not origin_allowed("http://192.168.1.5:8001", [], "0.0.0.0", request_host="192.168.1.5:8000")
    # the host name the server binds explicitly
    assert origin_allowed("http://myhost.lan:8000", [], "myhost.lan", request_host="myhost.lan:8000")
    # any other DNS name could be a rebinding attack: Origin and Host agree but the name is the attacker's
    assert not origin_allowed("http://evil.example:8000", [], "0.0.0.0", request_host="evil.example:8000")
    assert not origin_allowed("http://evil.example:8000", [], "127.0.0.1", request_host="evil.example:8000")
    assert origin_allowed("http://myhost.lan:8000", ["http://myhost.lan:8000"], "0.0.0.0",
                          request_host="myhost.lan:8000")


def test_null_and_malformed_origins_are_refused():
    assert not origin_allowed("null", [], "127.0.0.1")
    assert origin_allowed("null", ["null"], "0.0.0.0")
    for bad in ("localhost", "file:///etc/passwd", "http://", "http://localhost:99999", "http://localhost/path"):
        assert not origin_allowed(bad, [], "127.0.0.1"), bad


def test_is_loopback():
    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]", "app.localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "localhost.evil.example", "", None))
