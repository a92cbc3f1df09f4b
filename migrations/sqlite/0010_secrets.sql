-- The secret store: every version of every secret, sealed (AES-256-GCM, base64 of nonce,
-- ciphertext and tag) under the key named by key_id, bound to its name and version.
CREATE TABLE secrets (
    name       TEXT NOT NULL,
    version    BIGINT NOT NULL,
    key_id     TEXT NOT NULL,
    sealed     TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE INDEX secrets_key_id ON secrets (key_id);
