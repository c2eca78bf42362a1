-- Text compares byte-wise (COLLATE "C"), as in SQLite: listings and prefix scans order alike
-- whatever the database's locale.
CREATE TABLE meta (key TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE keys (id TEXT COLLATE "C" PRIMARY KEY, key_check BYTEA NOT NULL);
CREATE TABLE connections (
    id TEXT PRIMARY KEY,
    namespace TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    connection_name TEXT COLLATE "C" NOT NULL,
    app TEXT NOT NULL,
    method TEXT,
    project TEXT,
    description TEXT,
    settings TEXT NOT NULL,
    credentials_hash TEXT NOT NULL,
    version BIGINT NOT NULL,
    rotation_interval_days BIGINT,
    rotation_hours BIGINT,
    rotation_minutes BIGINT,
    last_rotation_time TEXT,
    next_rotation_at TEXT,
    hash_at_last_rotation TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    key_id TEXT COLLATE "C" NOT NULL,
    credentials BYTEA NOT NULL,
    UNIQUE (namespace, connection_name)
);
CREATE INDEX connections_key_id ON connections (key_id);
CREATE TABLE state (key TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL);
