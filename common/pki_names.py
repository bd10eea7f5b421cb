"""What a name in the PKI may be: a SuperLink address, as a certificate's SAN or as the
sites' ``--superlink HOST:PORT``, and a site name.

Checked before any key is made or file written, so a typo is refused with a message
naming the value, not found later as a TLS handshake that fails at every site.
"""

from __future__ import annotations

import ipaddress
import re

from cryptography import x509

from common.errors import ConfigError
from common.identifiers import is_site_id

_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def address_name(address: str) -> x509.GeneralName:
    """An ``--address`` as a SAN: an IP address, or a DNS name (ASCII, no port)."""
    value = address.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    name = value.lower()
    labels = name.split(".")
    if ":" in name:
        raise ConfigError(
            f"address {address!r} is neither an IP address nor a host name; give the "
            "SuperLink's host name or IP without a port"
        )
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ConfigError(
            f"address {address!r} is not a valid host name (letters, digits, '-' and '.'; "
            "write internationalised names in their xn-- form)"
        )
    return x509.DNSName(name)


def check_site_name(name: str) -> None:
    """Site names are the site ids of the site configs (and folder names here)."""
    if not is_site_id(name):
        raise ConfigError(
            f"site name {name!r} is not valid: use 2 to 63 lowercase letters, digits and "
            "'-', starting with a letter or digit (the site.id of the site's config)"
        )


def parse_superlink(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT``) as the sites' ``flower-supernode --superlink`` takes it."""
    bracketed = re.fullmatch(r"\[([^\]]+)\]:(\d+)", value)
    if bracketed:
        host, port_text = bracketed.groups()
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"--superlink {value!r}: {host!r} is not an IPv6 address") from None
    else:
        host, _, port_text = value.rpartition(":")
        if not host or not port_text.isdigit():
            raise ConfigError(
                f"--superlink {value!r} is not HOST:PORT (for example superlink.example.org:9092 "
                "or [2001:db8::1]:9092)"
            )
        if ":" in host:
            raise ConfigError(f"--superlink {value!r}: write an IPv6 address in brackets, [{host}]")
        address_name(host)
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"--superlink {value!r}: the port must be between 1 and 65535")
    return host, port
