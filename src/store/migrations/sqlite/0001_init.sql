CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE keys (id TEXT PRIMARY KEY, key_check BLOB NOT NULL);
CREATE TABLE connections (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    connection_name TEXT NOT NULL,
    app TEXT NOT NULL,
    method TEXT,
    project TEXT,
    description TEXT,
    settings TEXT NOT NULL,
    credentials_hash TEXT NOT NULL,
    version INTEGER NOT NULL,
    rotation_interval_days INTEGER,
    rotation_hours INTEGER,
    rotation_minutes INTEGER,
    last_rotation_time TEXT,
    next_rotation_at TEXT,
    hash_at_last_rotation TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    key_id TEXT NOT NULL,
    credentials BLOB NOT NULL,
    UNIQUE (namespace, connection_name)
);
CREATE INDEX connections_key_id ON connections (key_id);
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
