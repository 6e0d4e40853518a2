"""Refuse every network connection outside loopback, in this process and its children.

Tests put this folder first on PYTHONPATH, so every Python subprocess they start imports
it too: an accidental download then fails at once with a clear error instead of hanging.
Active only when ARTAUG_NETBLOCK=1.
"""

import ipaddress
import os
import socket

if os.environ.get("ARTAUG_NETBLOCK") == "1" and not getattr(socket, "_artaug_netblock", False):
    _LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}

    def _is_loopback(host) -> bool:
        if isinstance(host, bytes):
            host = host.decode()
        host = str(host).strip("[]")
        if host in _LOCAL_NAMES:
            return True
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            return False

    class NetworkBlockedError(ConnectionRefusedError):
        pass

    def _check(address):
        if isinstance(address, tuple) and address and not _is_loopback(address[0]):
            raise NetworkBlockedError(f"network access blocked in tests: {address[0]}:{address[1] if len(address) > 1 else ''}")

    _connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
    _getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address)
        return _connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address)
        return _connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_loopback(host):
            raise socket.gaierror(socket.EAI_NONAME, f"name resolution blocked in tests: {host}")
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo
    socket._artaug_netblock = True
