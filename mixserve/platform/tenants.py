"""Tenants and their API keys: who may call, which models, how much, with what weight.

Keys are never stored: a tenant entry holds only the SHA-256 hex digest of each key, and a
request's bearer token is hashed and looked up. `mixserve keys add TENANT --tenants FILE`
prints a new key once and appends its hash to the file.

With no tenants configured the front doors are open (the local quick start on loopback);
with any tenant configured every request needs a key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mixserve.errors import MixserveError

KEY_PREFIX = "msk-"
# Section 5 of the Mistral 7B paper: the system prompt that guards generation.
GUARDRAIL_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)
NAMED_SYSTEM_PROMPTS = {"guardrail": GUARDRAIL_PROMPT}


class TenantsError(MixserveError):
    """A tenants file is unreadable or invalid."""


class Tenant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="Tenant name (metrics label, usage key).")
    key_sha256: list[str] = Field(default_factory=list, description="SHA-256 hex digests of the tenant's API keys; keys themselves are never stored.")
    models: list[str] | None = Field(None, description="Served model names this tenant may call; omitted = all.")
    requests_per_min: int | None = Field(None, ge=1, description="Most requests admitted per rolling minute, across all ingress replicas.")
    tokens_per_min: int | None = Field(None, ge=1, description="Most prompt + completion tokens per rolling minute, across all ingress replicas.")
    max_concurrent: int | None = Field(None, ge=1, description="Most requests in flight at once, across all ingress replicas.")
    weight: float = Field(1.0, gt=0, le=1000, description="Priority weight in the attention replicas' weighted fair scheduling.")
    system_prompt: str | None = Field(
        None, max_length=8192,
        description="Default system prompt for chat requests that bring none: text, or a name ('guardrail' = the Mistral paper's).",
    )
    admin: bool = Field(False, description="May read every tenant's usage (GET /v1/usage).")

    @field_validator("key_sha256")
    @classmethod
    def _hex_digests(cls, value: list[str]) -> list[str]:
        for digest in value:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("key_sha256 entries must be 64 lowercase hex characters (a SHA-256 digest, not a key)")
        return value

    @property
    def has_limits(self) -> bool:
        return any(x is not None for x in (self.requests_per_min, self.tokens_per_min, self.max_concurrent))

    def resolved_system_prompt(self) -> str | None:
        return resolve_system_prompt(self.system_prompt)


def resolve_system_prompt(value: str | None) -> str | None:
    """A system prompt given as text or by name ('guardrail')."""
    if value is None:
        return None
    return NAMED_SYSTEM_PROMPTS.get(value, value)


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: list[Tenant] = Field(default_factory=list, description="Every tenant.")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def require_unique_names(tenants: list[Tenant]) -> None:
    names = [t.name for t in tenants]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TenantsError(f"tenants {twice} are defined twice")


class KeyRing:
    """Looks tenants up by API key (hashed first, compared in constant time)."""

    def __init__(self, tenants: list[Tenant]):
        require_unique_names(tenants)
        self.tenants = {t.name: t for t in tenants}
        self._by_hash = {digest: t for t in tenants for digest in t.key_sha256}

    @property
    def open(self) -> bool:
        """No tenants configured: no key needed."""
        return not self.tenants

    def lookup(self, key: str) -> Tenant | None:
        digest = hash_key(key)
        for known, tenant in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return tenant
        return None


def load_tenants(path: str | Path) -> list[Tenant]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise TenantsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise TenantsError(f"{path} is not valid YAML: {exc}") from None
    try:
        return TenantsFile.model_validate(data).tenants
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise TenantsError(f"{path}: {problems}") from None


def add_key(path: str | Path, tenant: str) -> str:
    """Creates a key for `tenant` (adding the tenant if new), stores its hash, returns the key."""
    path = Path(path)
    tenants = load_tenants(path) if path.exists() else []
    key = new_key()
    for entry in tenants:
        if entry.name == tenant:
            entry.key_sha256.append(hash_key(key))
            break
    else:
        tenants.append(Tenant(name=tenant, key_sha256=[hash_key(key)]))
    data = TenantsFile(tenants=tenants).model_dump(exclude_defaults=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)  # atomic: a crash never leaves half a file
    return key
