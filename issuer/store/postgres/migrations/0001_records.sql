-- keyissuer records: one per issued key. See issuer/store.
CREATE TABLE records (
	unique_id   text PRIMARY KEY,
	salt        text NOT NULL,
	customer_id text NOT NULL DEFAULT '',
	client_id   text NOT NULL DEFAULT '',
	state       text NOT NULL CHECK (state IN ('issued', 'consuming', 'consumed', 'expired', 'lost')),
	issued_at   timestamptz NOT NULL,
	expires_at  timestamptz NOT NULL,
	closed_at   timestamptz,
	-- The instance that issued the key, and the one that claimed it for
	-- its decrypt (cluster mode; empty otherwise).
	instance_id text NOT NULL DEFAULT '',
	claimed_by  text NOT NULL DEFAULT ''
);

-- The records whose key may still exist, by expiry: the reaper's scan.
CREATE INDEX records_active ON records (expires_at, unique_id) WHERE state IN ('issued', 'consuming');
-- Finished records by the time they finished: pruning.
CREATE INDEX records_closed ON records (closed_at, unique_id) WHERE state NOT IN ('issued', 'consuming');
-- Outstanding keys by holder: the quotas.
CREATE INDEX records_outstanding_customer ON records (customer_id) WHERE state = 'issued';
CREATE INDEX records_outstanding_client ON records (client_id) WHERE state = 'issued';
CREATE INDEX records_claimed_by ON records (claimed_by) WHERE state = 'consuming';
