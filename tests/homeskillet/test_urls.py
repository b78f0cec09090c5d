"""`homeskillet.urls.check_url`: which base URLs Homeskillet may post to, without DNS; and the
catalog's `serving.base_url`, checked by it."""

import pytest
from pydantic import ValidationError

from homeskillet.schemas import OpenAIServing
from homeskillet.urls import check_url, is_private_host

GOOD = [
    ("https://api.openai.com/v1", "https://api.openai.com/v1"),
    ("HTTPS://API.Example.COM/v1/", "https://api.example.com/v1"),
    ("http://8.8.8.8:8000/v1", "http://8.8.8.8:8000/v1"),
    ("http://[2001:4860:4860::8888]:8000/v1", "http://[2001:4860:4860::8888]:8000/v1"),
    ("https://panel.example/api/pods/p-1/k3y/v1", "https://panel.example/api/pods/p-1/k3y/v1"),
    ("http://x/v1", "http://x/v1"),
]
PRIVATE = [  # refused unless private hosts are allowed
    ("http://127.0.0.1:4200", "http://127.0.0.1:4200"),
    ("http://[::1]", "http://[::1]"),
    ("http://0.0.0.0", "http://0.0.0.0"),
    ("http://10.1.2.3:8000/v1", "http://10.1.2.3:8000/v1"),
    ("http://192.168.0.7/v1", "http://192.168.0.7/v1"),
    ("http://172.16.0.1/v1", "http://172.16.0.1/v1"),
    ("http://[fd00::1]/v1", "http://[fd00::1]/v1"),
    ("http://100.64.0.1/v1", "http://100.64.0.1/v1"),
    ("http://localhost:8080/v1", "http://localhost:8080/v1"),
    ("http://api.localhost/v1", "http://api.localhost/v1"),
    ("http://127.1:4200", "http://127.1:4200"),  # 127.0.0.1 in the resolver's short spelling
    ("http://2130706433/", "http://2130706433"),  # 127.0.0.1 as one number
    ("http://0x7f.0.0.1/", "http://0x7f.0.0.1"),
    ("http://[::ffff:127.0.0.1]/v1", "http://[::ffff:127.0.0.1]/v1"),  # IPv4-mapped loopback
]
ALWAYS_BAD = [  # refused whatever is allowed: (url, words the error must hold)
    ("http://127.0.0.1:4200#", "fragment"),
    ("http://x/v1#/../../admin", "fragment"),
    ("http://x/v1?y", "query"),
    ("http://x/v1?", "query"),
    ("http://user:pw@h", "credentials"),
    ("http://user@h/v1", "credentials"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("ftp://x/v1", "scheme 'ftp'"),
    ("gopher://x:70/", "scheme"),
    ("//x/v1", "scheme '(none)'"),
    ("x/v1", "scheme"),
    ("", "no URL"),
    ("http://", "no host"),
    ("http:///v1", "no host"),
    ("http://169.254.169.254", "link-local"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://169.254.1.1:8000/v1", "link-local"),
    ("http://[fe80::1]/v1", "link-local"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),  # 169.254.169.254 through NAT64
    ("http://[fd00:ec2::254]/", "link-local"),
    ("http://metadata.google.internal/computeMetadata/v1", "metadata"),
    ("http://224.0.0.1/", "multicast"),
    ("http://x:99999/v1", "port"),
    ("http://x /v1", "whitespace"),
    ("http://x\\@evil/v1", "backslash"),
]


@pytest.mark.parametrize(("url", "normalised"), GOOD)
def test_public_http_urls_pass_and_are_normalised(url, normalised):
    assert check_url(url, what="w", allow_private=False) == normalised
    assert check_url(url, what="w", allow_private=True) == normalised


@pytest.mark.parametrize(("url", "normalised"), PRIVATE)
def test_private_and_loopback_hosts_pass_only_when_allowed(url, normalised):
    assert check_url(url, what="w", allow_private=True) == normalised
    with pytest.raises(ValueError, match=r"^the service URL: host .*(loopback|private|unspecified)"):
        check_url(url, what="the service URL", allow_private=False)


@pytest.mark.parametrize(("url", "problem"), ALWAYS_BAD)
@pytest.mark.parametrize("allow_private", [False, True])
def test_bad_urls_are_refused_naming_what_and_the_problem(url, problem, allow_private):
    with pytest.raises(ValueError) as caught:
        check_url(url, what="the pod's service URL", allow_private=allow_private)
    message = str(caught.value)
    assert message.startswith("the pod's service URL: ") and problem in message


def test_errors_show_the_host_never_the_path_or_the_password():
    secret = "s3cr3t-path-key"
    for url in (f"http://127.0.0.1:4200/pods/p/{secret}/v1", f"http://u:{secret}@h/v1", f"http://h/{secret}?q"):
        with pytest.raises(ValueError) as caught:
            check_url(url, what="w", allow_private=False)
        assert secret not in str(caught.value)


def test_private_hosts_are_told_from_public_ones():
    assert is_private_host("127.0.0.1") and is_private_host("localhost") and is_private_host("10.0.0.1")
    assert is_private_host("::1") and is_private_host("2130706433")
    assert not is_private_host("panel.example") and not is_private_host("8.8.8.8")


def test_a_catalogs_base_url_may_be_on_loopback_but_must_be_a_base():
    assert OpenAIServing(base_url="http://127.0.0.1:8080/v1/", model="m").base_url == "http://127.0.0.1:8080/v1"
    assert OpenAIServing(base_url="https://api.openai.com/v1", model="m").base_url == "https://api.openai.com/v1"
    for url, problem in [
        ("http://127.0.0.1:4200#", "fragment"),
        ("http://x/v1?y", "query"),
        ("http://user:pw@h/v1", "credentials"),
        ("file:///etc/passwd", "scheme"),
        ("http://169.254.169.254/v1", "link-local"),
    ]:
        with pytest.raises(ValidationError, match=f"serving.base_url: .*{problem}"):
            OpenAIServing(base_url=url, model="m")
