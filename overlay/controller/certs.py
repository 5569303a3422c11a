"""``overlay certs``: a small private CA for the controller's mutual TLS (docs/grpc.md).

Every certificate names its holder in a URI subject alternative name,
``urn:overlay:<role>:<name>``, which is what the controller authorises on:

    controller   urn:overlay:controller:controller   (+ DNS/IP names it is reached by)
    operator     urn:overlay:operator:operator       may do everything
    node         urn:overlay:node:<node_id>          may act only on its own node

Keys are ECDSA P-256, written with mode 0600. The common name repeats the name
(truncated to 64 characters) for people reading the certificate.

Files are written safely: a temporary file with a random name in the target directory,
created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (never through a planted file or link), then
renamed into place; a directory that is group- or world-writable, or not this user's, is
refused (another user could swap the files).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import stat
from dataclasses import dataclass

from overlay.errors import OverlayError
from overlay.model import valid_name

URN_PREFIX = "urn:overlay:"
ROLES = ("controller", "operator", "node")
RESERVED = ("ca", "controller", "operator")
CA_DAYS = 3650
LEAF_DAYS = 825


@dataclass(frozen=True)
class Identity:
    role: str   # controller | operator | node
    name: str   # node_id for nodes

    def __str__(self) -> str:
        return f"{self.role} {self.name}" if self.role == "node" else self.role


def identity_of(pem: bytes) -> Identity | None:
    """The overlay identity a certificate carries, or None if it carries none (or two)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    found = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(URN_PREFIX)]
    if len(found) != 1:
        return None
    role, sep, name = found[0][len(URN_PREFIX):].partition(":")
    if not sep or role not in ROLES:
        return None
    try:
        valid_name(name, "name")
    except ValueError:
        return None
    return Identity(role, name)


_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _write(path: str, data: bytes, private: bool) -> None:
    """Write ``path`` through a fresh temporary file beside it, renamed into place."""
    mode = 0o600 if private else 0o644
    directory, name = os.path.split(path)
    for _ in range(16):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, _FLAGS, mode)
            break
        except FileExistsError:
            continue
    else:
        raise OverlayError(f"cannot make a temporary file in {directory or '.'}")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def check_dir(directory: str) -> None:
    """Refuse a directory that others could write in (group/world-writable) or that is not
    this user's: they could replace a key or a certificate."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise OverlayError(f"--dir {directory} does not exist: run `overlay certs init --dir {directory}` "
                           "first") from None
    except OSError as exc:
        raise OverlayError(f"--dir {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OverlayError(f"--dir {directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise OverlayError(f"--dir {directory} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}); "
                           "use a directory of your own")
    if st.st_mode & 0o022:
        raise OverlayError(f"--dir {directory} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):o}); "
                           "chmod go-w it (0700 is best)")


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(role: str, cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "overlay"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        x509.NameAttribute(NameOID.COMMON_NAME, cn[:64]),
    ])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _make_ca(days: int = CA_DAYS):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _key()
    name = _name("ca", "overlay CA")
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _expiry(cert) -> datetime.datetime:
    utc = getattr(cert, "not_valid_after_utc", None)  # cryptography >= 42
    return utc if utc is not None else cert.not_valid_after.replace(tzinfo=datetime.UTC)


def _issue(ca_key, ca_cert, role: str, name: str, names: tuple[str, ...] = (), days: int = LEAF_DAYS):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _key()
    now = _now()
    alt: list = [x509.UniformResourceIdentifier(f"{URN_PREFIX}{role}:{name}")]
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "controller":
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(role, name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), _expiry(ca_cert)))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _load_ca(directory: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_crt, ca_key = os.path.join(directory, "ca.crt"), os.path.join(directory, "ca.key")
    try:
        with open(ca_crt, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
        with open(ca_key, "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), password=None)
    except FileNotFoundError as exc:
        raise OverlayError(f"{exc.filename} is missing: run `overlay certs init --dir {directory}` first") from None
    except (OSError, ValueError, TypeError) as exc:
        raise OverlayError(f"cannot load the CA from {directory}: {exc}") from None
    return key, cert


def _check_names(names: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for n in names:
        try:
            ipaddress.ip_address(n)
        except ValueError:
            labels = n.rstrip(".").split(".")
            if not n or len(n) > 253 or not all(lab and len(lab) <= 63 and
                                                all(c.isalnum() or c in "-*" for c in lab) for lab in labels):
                raise OverlayError(f"--name {n!r} is neither an IP address nor a DNS name") from None
        out.append(n)
    return tuple(out)


def init(directory: str, names: tuple[str, ...] = (), force: bool = False) -> list[str]:
    """Create ca.crt/.key, controller.crt/.key (localhost, 127.0.0.1 and ``names``) and
    operator.crt/.key in ``directory``. Existing files are kept unless ``force``.
    Returns the files written."""
    names = _check_names(names)
    if not os.path.exists(directory):
        os.makedirs(directory, mode=0o700)
    check_dir(directory)
    p = lambda f: os.path.join(directory, f)  # noqa: E731
    written: list[str] = []
    if force or not (os.path.exists(p("ca.crt")) and os.path.exists(p("ca.key"))):
        key, cert = _make_ca()
        _write(p("ca.key"), _key_pem(key), private=True)
        _write(p("ca.crt"), _cert_pem(cert), private=False)
        written += ["ca.crt", "ca.key"]
        force = True  # a new CA invalidates every certificate issued by the old one
    ca_key, ca_cert = _load_ca(directory)
    all_names = tuple(dict.fromkeys(("localhost", "127.0.0.1", *names)))
    for role, extra in (("controller", all_names), ("operator", ())):
        if not force and os.path.exists(p(f"{role}.crt")) and os.path.exists(p(f"{role}.key")):
            continue
        key, cert = _issue(ca_key, ca_cert, role, role, extra)
        _write(p(f"{role}.key"), _key_pem(key), private=True)
        _write(p(f"{role}.crt"), _cert_pem(cert), private=False)
        written += [f"{role}.crt", f"{role}.key"]
    return written


def issue(directory: str, node_id: str, force: bool = False) -> list[str]:
    """Create ``<node_id>.crt/.key``, a node certificate, signed by the CA in ``directory``."""
    try:
        valid_name(node_id, "node_id")
    except ValueError as exc:
        raise OverlayError(f"--node: {exc}") from None
    if node_id in RESERVED:
        raise OverlayError(f"--node {node_id!r} would overwrite {node_id}.crt; choose another node id")
    check_dir(directory)
    ca_key, ca_cert = _load_ca(directory)
    crt, key_path = os.path.join(directory, f"{node_id}.crt"), os.path.join(directory, f"{node_id}.key")
    if not force and (os.path.exists(crt) or os.path.exists(key_path)):
        raise OverlayError(f"{crt} already exists (use --force to replace it)")
    key, cert = _issue(ca_key, ca_cert, "node", node_id)
    _write(key_path, _key_pem(key), private=True)
    _write(crt, _cert_pem(cert), private=False)
    return [f"{node_id}.crt", f"{node_id}.key"]
