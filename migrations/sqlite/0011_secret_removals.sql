-- The last version each removed secret had: a secret set again after `rm` continues from it,
-- so a version number never names two values (pins and history stay unambiguous).
CREATE TABLE secret_removals (
    name         TEXT PRIMARY KEY,
    last_version BIGINT NOT NULL
);
