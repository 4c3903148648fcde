"""PQXDH key agreement with X25519 and ML-KEM-768 (Signal PQXDH spec, revision 3).

Implements section 3.3 ("Sending the initial message") in :func:`initiate` and
section 3.4 ("Receiving the initial message") in :func:`respond`, with the
parameters of section 2.1 chosen as::

    curve  = curve25519 (X25519)           hash = SHA-256
    pqkem  = ML-KEM-768 (FIPS 203)         AEAD = AES-256-GCM (in the ratchet)
    info   = "AgentMesh_PQXDH_v1_X25519_SHA-256_ML-KEM-768"

KDF (section 2.2): ``HKDF-SHA256(salt = 32 zero bytes, IKM = F || KM, info)``
with ``F`` = 32 bytes of 0xFF and ``KM = DH1 || DH2 || DH3 [|| DH4] || SS``.

Identity keys are AgentMesh's X25519 identity keys, bound to the Ed25519
signing keys (see :mod:`agentmesh.crypto.identity`); the associated data
encodes both identities *and* both agent ids with length prefixes
(section 3.3: ``AD = Encode(IK_A) || Encode(IK_B)``, extended).

Replay of an initial message without a one-time prekey (nothing is consumed,
so it would build a valid session again): :func:`respond` refuses a base key
``EK_A`` already accepted with the same signed prekey and records new ones in the
PrekeySecrets it is given (libsignal's ``ReusedBaseKeyException``; see
:mod:`agentmesh.crypto.prekeys` for the bound).

No I/O; randomness is injected. :func:`initiate` changes no state; :func:`respond`
changes only the PrekeySecrets passed in, and only when it succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentmesh.crypto import primitives as p
from agentmesh.crypto.identity import IdentityKeyPair, PublicIdentity
from agentmesh.crypto.prekeys import PrekeyBundle, PrekeySecrets
from agentmesh.errors import InvalidKeyError
from agentmesh.wire.codec import Writer
from agentmesh.wire.envelope import PrekeyMessage

PQXDH_INFO = b"AgentMesh_PQXDH_v1_X25519_SHA-256_ML-KEM-768"
_F = b"\xff" * 32
_AD_CONTEXT = b"AgentMesh-AD-v1"


def kdf(key_material: bytes) -> bytes:
    """PQXDH section 2.2 KDF: HKDF-SHA256 over ``F || KM`` with a zero salt."""
    return p.hkdf_sha256(_F + key_material, salt=bytes(32), info=PQXDH_INFO, length=32)


def associated_data(
    initiator_id: str, initiator: PublicIdentity, responder_id: str, responder: PublicIdentity
) -> bytes:
    """Unambiguous AD: context, then each party's id (length-prefixed) and both keys."""
    w = Writer().raw(_AD_CONTEXT)
    w.str8(initiator_id).raw(initiator.signing).raw(initiator.exchange)
    w.str8(responder_id).raw(responder.signing).raw(responder.exchange)
    return w.getvalue()


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """The shared secret SK, the AD, and what each side needs for the ratchet."""

    shared_key: bytes
    associated_data: bytes
    #: The responder's signed prekey public key: the initiator's first DHr (spec 3.3).
    responder_ratchet_public: bytes
    prekey_message: PrekeyMessage | None = None


def initiate(
    identity: IdentityKeyPair,
    own_id: str,
    bundle: PrekeyBundle,
    rng: p.RandomBytes = p.random_bytes,
) -> HandshakeResult:
    """Section 3.3: verify the bundle, then derive SK and build the initial-message fields.

    Raises SignatureError/InvalidKeyError if any bundle signature or key is bad
    (the spec: "If the signature verification fails, Alice aborts the protocol").
    """
    bundle.verify()
    ephemeral = p.x25519_generate(rng)
    dh1 = p.x25519(identity.exchange_private, bundle.signed_prekey.public)
    dh2 = p.x25519(ephemeral, bundle.identity.exchange)
    dh3 = p.x25519(ephemeral, bundle.signed_prekey.public)
    km = dh1 + dh2 + dh3
    if bundle.one_time_prekey is not None:
        km += p.x25519(ephemeral, bundle.one_time_prekey.public)
    shared_secret, kem_ciphertext = p.mlkem_encapsulate(bundle.kem_prekey.public)
    sk = kdf(km + shared_secret)
    me = identity.public
    message = PrekeyMessage(
        identity_signing=me.signing,
        identity_exchange=me.exchange,
        identity_binding=me.binding,
        ephemeral=p.x25519_public_bytes(ephemeral),
        signed_prekey_id=bundle.signed_prekey.prekey_id,
        kem_prekey_id=bundle.kem_prekey.prekey_id,
        kem_ciphertext=kem_ciphertext,
        one_time_prekey_id=(
            bundle.one_time_prekey.prekey_id if bundle.one_time_prekey is not None else None
        ),
    )
    return HandshakeResult(
        shared_key=sk,
        associated_data=associated_data(own_id, me, bundle.agent_id, bundle.identity),
        responder_ratchet_public=bundle.signed_prekey.public,
        prekey_message=message,
    )


def respond(
    identity: IdentityKeyPair,
    own_id: str,
    prekeys: PrekeySecrets,
    initiator_id: str,
    message: PrekeyMessage,
) -> tuple[HandshakeResult, bytes]:
    """Section 3.4: derive SK from an initial message.

    Returns the result and the raw private signed prekey (the responder's first
    ratchet key pair, Double Ratchet section 3.3). Does **not** erase the
    one-time keys: the caller erases them (``prekeys.consume``) only after the
    first ciphertext authenticates, so a forged initial message changes nothing.
    Without a one-time prekey it records the base key in ``prekeys``: pass a
    copy, and keep it only once the first ciphertext authenticates (as
    ``SessionRecord.decrypt`` does), so a forgery records nothing either.
    Raises ReplayError if such a base key was already accepted with this signed
    prekey, InvalidKeyError/SignatureError on any bad key or unknown prekey id;
    then ``prekeys`` is unchanged.
    """
    initiator = PublicIdentity(
        message.identity_signing, message.identity_exchange, message.identity_binding
    ).verify()
    p.validate_x25519_public(message.ephemeral)
    spk_private = prekeys.signed_private(message.signed_prekey_id)
    last_resort = message.one_time_prekey_id is None
    if last_resort:
        prekeys.check_base_key(message.signed_prekey_id, message.ephemeral)
    spk = p.x25519_private_from_bytes(spk_private)
    dh1 = p.x25519(spk, initiator.exchange)
    dh2 = p.x25519(identity.exchange_private, message.ephemeral)
    dh3 = p.x25519(spk, message.ephemeral)
    km = dh1 + dh2 + dh3
    if message.one_time_prekey_id is not None:
        opk = p.x25519_private_from_bytes(prekeys.one_time_private(message.one_time_prekey_id))
        km += p.x25519(opk, message.ephemeral)
    seed, _ = prekeys.kem_private(message.kem_prekey_id)
    shared_secret = p.mlkem_decapsulate(p.mlkem_private_from_seed(seed), message.kem_ciphertext)
    if len(shared_secret) != 32:
        raise InvalidKeyError("unexpected ML-KEM shared secret length")
    result = HandshakeResult(
        shared_key=kdf(km + shared_secret),
        associated_data=associated_data(initiator_id, initiator, own_id, identity.public),
        responder_ratchet_public=p.x25519_public_bytes(spk),
    )
    if last_resort:
        prekeys.record_base_key(message.signed_prekey_id, message.ephemeral)
    return result, spk_private
