"""matrix-nio as a member of staff: logs in with the directory password and finds the
space of their department, with its room, made from a directory group.

Starts its own OpenLDAP ``slapd`` (private configuration, loopback port; Debian's
package, installed by scripts/test) and its own Salon configured for it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from nio import AsyncClient, LoginResponse, RoomGetStateEventResponse, SyncResponse

from conftest import _free_loopback_port, _salon_bin, _stop, _versions_ok
from helpers import CLIENT_CONFIG, bounded

SUFFIX = "dc=salon,dc=test"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"


def _slapd(tmp: Path) -> tuple[subprocess.Popen, str]:
    if not os.path.exists("/usr/sbin/slapd"):
        pytest.fail("OpenLDAP's slapd is not installed: scripts/test installs it", pytrace=False)
    (tmp / "db").mkdir()
    conf = tmp / "slapd.conf"
    conf.write_text(
        f"""include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/nis.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {tmp}/slapd.pid
argsfile {tmp}/slapd.args
database mdb
maxsize 104857600
suffix "{SUFFIX}"
rootdn "cn=admin,{SUFFIX}"
rootpw admin-password
directory {tmp}/db
access to attrs=userPassword by self write by anonymous auth by * none
access to * by * read
"""
    )
    ldif = tmp / "data.ldif"
    ldif.write_text(
        f"""dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
o: Salon
dc: salon

dn: {PEOPLE}
objectClass: organizationalUnit
ou: people

dn: uid=nadia,{PEOPLE}
objectClass: inetOrgPerson
uid: nadia
cn: Nadia Benali
sn: Benali
userPassword: nadia-secret

dn: {GROUPS}
objectClass: organizationalUnit
ou: groups

dn: cn=protocol,{GROUPS}
objectClass: groupOfNames
cn: protocol
member: uid=nadia,{PEOPLE}
"""
    )
    subprocess.run(["slapadd", "-f", str(conf), "-l", str(ldif)], check=True, capture_output=True)
    port = _free_loopback_port()
    uri = f"ldap://127.0.0.1:{port}"
    proc = subprocess.Popen(
        ["/usr/sbin/slapd", "-f", str(conf), "-h", f"{uri}/", "-d", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, uri


@pytest.fixture
def ldap_salon():
    tmp = Path(tempfile.mkdtemp(prefix="salon-ldap-"))
    (tmp / "ldap").mkdir()
    slapd, uri = _slapd(tmp / "ldap")
    port = _free_loopback_port()
    env = dict(os.environ)
    env.update(
        SALON_SERVER_NAME="localhost",
        SALON_LISTEN=f"127.0.0.1:{port}",
        SALON_DATA_DIR=str(tmp / "data"),
        SALON_RATE_LIMITS__ENABLED="false",
        SALON_LDAP__ENABLED="true",
        SALON_LDAP__URI=uri,
        SALON_LDAP__BASE_DN=PEOPLE,
        SALON_LDAP__BIND_DN=f"cn=admin,{SUFFIX}",
        SALON_LDAP__BIND_PASSWORD="admin-password",
        SALON_LDAP__SYNC_INTERVAL_MINUTES="0",
        SALON_LDAP__GROUPS=(
            f'[{{ group = "cn=protocol,{GROUPS}", space = "protocol", name = "Protocol office", '
            f'rooms = ["protocol-travel"] }}]'
        ),
    )
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([_salon_bin(), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _versions_ok(base):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"salon did not start:\n{(tmp / 'server.log').read_text()}", pytrace=False)
            time.sleep(0.1)
        yield base
    finally:
        _stop(proc)
        slapd.kill()
        slapd.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


async def test_staff_member_logs_in_and_finds_the_department_space(ldap_salon):
    client = AsyncClient(ldap_salon, "nadia", config=CLIENT_CONFIG)
    try:
        resp = await bounded(client.login("nadia-secret"))
        assert isinstance(resp, LoginResponse), resp
        assert resp.user_id == "@nadia:localhost"

        sync = await bounded(client.sync(timeout=0, full_state=True))
        assert isinstance(sync, SyncResponse), sync
        rooms = client.rooms
        spaces = [r for r in rooms.values() if r.room_type == "m.space"]
        assert [s.display_name for s in spaces] == ["Protocol office"]
        space = spaces[0]
        others = [r for r in rooms.values() if r.room_type != "m.space"]
        assert len(others) == 1
        travel = others[0]
        assert travel.canonical_alias == "#protocol-travel:localhost"
        # The room is listed as a child of the space.
        child = await bounded(client.room_get_state_event(space.room_id, "m.space.child", travel.room_id))
        assert isinstance(child, RoomGetStateEventResponse), child
        assert child.content["via"] == ["localhost"]
        # Nadia's display name comes from the directory.
        assert space.users["@nadia:localhost"].display_name == "Nadia Benali"
    finally:
        await client.close()
