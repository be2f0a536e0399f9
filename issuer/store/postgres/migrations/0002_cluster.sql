-- Cluster mode: the instances, their pooled keys, and the public API's
-- replay cache.

-- One row per instance id. session is random per process start: the
-- process that holds the id now. lease_until is renewed by its heartbeat;
-- past it, the instance counts as dead and its neighbours clean up after it.
CREATE TABLE instances (
	instance_id      text PRIMARY KEY,
	session          text NOT NULL,
	host             text NOT NULL DEFAULT '',
	started_at       timestamptz NOT NULL,
	heartbeat_at     timestamptz NOT NULL,
	lease_until      timestamptz NOT NULL,
	pool_ready       integer NOT NULL DEFAULT 0,
	pending_destroys integer NOT NULL DEFAULT 0
);

-- Keys in an instance's pool, recorded before they are generated
-- ('generating') so that no neighbour's reconciliation takes a fresh key's
-- objects for a leak; 'ready' once generated. A key leaves this table when
-- it is issued (its record is created in the same transaction) or destroyed.
-- 'destroying': a neighbour took the key over from a dead instance (now its
-- instance_id) and destroys it.
CREATE TABLE pool_keys (
	unique_id   text PRIMARY KEY,
	instance_id text NOT NULL,
	state       text NOT NULL CHECK (state IN ('generating', 'ready', 'destroying')),
	created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pool_keys_instance ON pool_keys (instance_id);

-- Request digests the public API has seen, until they expire.
CREATE TABLE replay (
	digest     bytea PRIMARY KEY,
	expires_at timestamptz NOT NULL
);
CREATE INDEX replay_expires ON replay (expires_at);
