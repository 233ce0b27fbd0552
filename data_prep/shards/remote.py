"""The address rule for shards read over http(s): hosts you typed may be private, nothing else may.

Training, eval, score, filter, index and verify read `http(s)://` shards through fsspec (aiohttp underneath).
The URLs you type (a `data.train` spec, the dataset argument of `plait prep score`) may name your own private
hosts: an internal object store or a test server on loopback is ordinary. A host you did not type (where a
redirect leads) must not resolve to a loopback, private, link-local, multicast, reserved, unspecified or
cloud-metadata address, unless it is listed in `PLAIT_TRUSTED_HOSTS` (comma-separated host names or
addresses). Names a dataset's own files give cannot add a host: they are plain file names inside the typed
folder (`layout.check_shard_name`).

The rule is enforced inside aiohttp, where it cannot be skipped: a resolver that checks every address it
returns (aiohttp connects to exactly those, so a second lookup cannot rebind the name), and a trace hook that
checks host literals (which aiohttp does not resolve) on the first request and on every redirect. It is
installed into fsspec's per-protocol defaults when this package is imported, so every http filesystem made
afterwards in this process, and in its forked or spawned children, carries it.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import urllib.parse

import fsspec.config

ENV = "PLAIT_TRUSTED_HOSTS"
METADATA_HOSTS = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"),
                  ipaddress.ip_address("100.100.100.200")}


class RefusedAddress(ConnectionRefusedError):
    """A host that is not trusted resolved to an address the rule refuses (an OSError, so every reader's
    handling of a host that cannot be reached applies, with this message)."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.ECONNREFUSED, why)  # aiohttp's connection error quotes strerror


def check_address(ip: str) -> str | None:
    """Why connecting to `ip` is refused by default (`loopback`, `private`, ...), or None."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if getattr(addr, "ipv4_mapped", None):
        addr = addr.ipv4_mapped
    if addr in METADATA_HOSTS:
        return "metadata"
    for label in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(addr, f"is_{label}"):
            return label.replace("_", "-")
    return None


def _host(url: str) -> str | None:
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError:
        return None
    return host.lower().strip("[]") if host else None


def trusted_hosts() -> set[str]:
    return {h.strip().lower().strip("[]") for h in os.environ.get(ENV, "").split(",") if h.strip()}


def trust(*urls: str) -> None:
    """Trust the hosts of `urls` (the ones a user typed) in this process and the processes it starts."""
    hosts = trusted_hosts()
    new = {h for u in urls if isinstance(u, str) and u.startswith(("http://", "https://")) and (h := _host(u))}
    if new - hosts:
        os.environ[ENV] = ",".join(sorted(hosts | new))


def refusal(host: str, ip: str) -> str | None:
    """Why `host` (not typed) may not be reached at `ip`, or None."""
    if host in trusted_hosts():
        return None
    why = check_address(ip)
    if why is None:
        return None
    return (f"refused {why} address {ip} for host {host!r}: only hosts you typed (or list in {ENV}) may be "
            f"private; this one came from a redirect")


def refused_in(exn: BaseException) -> RefusedAddress | None:
    """The refusal behind `exn` (aiohttp and fsspec wrap it), or None."""
    seen = set()
    while exn is not None and id(exn) not in seen:
        if isinstance(exn, RefusedAddress):
            return exn
        seen.add(id(exn))
        exn = exn.__cause__ or exn.__context__
    return None


def _check_url(url) -> None:
    host = (url.host or "").lower().strip("[]")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return  # a name: the resolver checks what it resolves to
    why = refusal(host, host)
    if why:
        raise RefusedAddress(why)


def _resolver_class():
    import aiohttp

    class CheckingResolver(aiohttp.abc.AbstractResolver):
        """aiohttp's default resolver, then the rule on every address it returns."""

        def __init__(self) -> None:
            self.inner = aiohttp.DefaultResolver()

        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
            found = await self.inner.resolve(host, port, family)
            for entry in found:
                why = refusal(host.lower(), entry["host"])
                if why:
                    raise RefusedAddress(why)
            return found

        async def close(self) -> None:
            await self.inner.close()

    return CheckingResolver


async def _on_request_start(session, ctx, params) -> None:
    _check_url(params.url)


async def _on_request_redirect(session, ctx, params) -> None:
    location = params.response.headers.get("Location") or params.response.headers.get("URI")
    if location:
        _check_url(params.url.join(type(params.url)(location)))


async def guarded_client(**kwargs):
    """fsspec's `get_client` hook: an aiohttp session under the address rule."""
    import aiohttp
    traces = aiohttp.TraceConfig()
    traces.on_request_start.append(_on_request_start)
    traces.on_request_redirect.append(_on_request_redirect)
    kwargs["trace_configs"] = [*kwargs.get("trace_configs", ()), traces]
    kwargs.setdefault("connector", aiohttp.TCPConnector(resolver=_resolver_class()()))
    return aiohttp.ClientSession(**kwargs)


def install() -> None:
    """Make the rule fsspec's default for http and https filesystems."""
    for protocol in ("http", "https"):
        fsspec.config.conf.setdefault(protocol, {})["get_client"] = guarded_client
