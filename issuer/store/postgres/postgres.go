// Package postgres is the PostgreSQL record store, which several keyissuerd
// instances share in cluster mode. It keeps the contract of
// [storetest.Store]: every state change is one conditional UPDATE, so two
// instances racing on one key produce exactly one claim.
//
// The schema lives in migrations/, one numbered SQL file per version,
// applied in order at [Open] under an advisory lock, so instances starting
// together do not race; an instance refuses a database whose schema is
// newer than the files it carries.
package postgres

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/keyissuer/keyissuer/issuer/store"
)

//go:embed migrations/*.sql
var migrations embed.FS

// Options open a [Store].
type Options struct {
	// DSN is a libpq connection string (key=value or a postgres:// URL),
	// without the password.
	DSN string
	// Password is the role's password ("" for none: trust or peer auth).
	Password string
	// MaxConns bounds the connection pool (default 16).
	MaxConns int32
	// SettleTimeout bounds a Settle's write (default 5s): should it fail,
	// the record stays in its state from, as a crash would leave it.
	SettleTimeout time.Duration
}

// Store is the PostgreSQL store. It is safe for concurrent use, by many
// goroutines and many processes.
type Store struct {
	pool          *pgxpool.Pool
	settleTimeout time.Duration
}

// CheckDSN refuses a DSN that carries a password: it belongs in a file or
// the environment, never in a config file.
func CheckDSN(dsn string) error {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return errors.New("not a valid postgres:// URL")
		}
		if _, ok := u.User.Password(); ok || u.Query().Has("password") {
			return errors.New("carries a password; give it in store.password_file or store.password_env")
		}
		return nil
	}
	for _, f := range strings.Fields(dsn) {
		if k, _, _ := strings.Cut(f, "="); strings.TrimSpace(k) == "password" {
			return errors.New("carries a password; give it in store.password_file or store.password_env")
		}
	}
	if _, err := pgconn.ParseConfig(dsn); err != nil {
		return fmt.Errorf("not a valid connection string: %w", err)
	}
	return nil
}

// Open connects, applies the migrations the database lacks and returns the
// store.
func Open(ctx context.Context, opts Options) (*Store, error) {
	if err := CheckDSN(opts.DSN); err != nil {
		return nil, fmt.Errorf("store.dsn: %w", err)
	}
	cfg, err := pgxpool.ParseConfig(opts.DSN)
	if err != nil {
		return nil, fmt.Errorf("store.dsn: %w", err)
	}
	if opts.Password != "" {
		cfg.ConnConfig.Password = opts.Password
	}
	cfg.MaxConns = 16
	if opts.MaxConns > 0 {
		cfg.MaxConns = opts.MaxConns
	}
	if opts.SettleTimeout == 0 {
		opts.SettleTimeout = 5 * time.Second
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("failed to open record store: %w", err)
	}
	s := &Store{pool: pool, settleTimeout: opts.SettleTimeout}
	if err := s.migrate(ctx); err != nil {
		pool.Close()
		return nil, err
	}
	return s, nil
}

// Close closes the pool's connections.
func (s *Store) Close() error {
	s.pool.Close()
	return nil
}

// Pool is the connection pool, for the cluster's own tables (cluster.go)
// and for tests.
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// migrationLock is the advisory lock key under which migrations run.
const migrationLock = 0x6b65796973737565 // "keyissue"

type migration struct {
	version int
	name    string
	sql     string
}

func loadMigrations() ([]migration, error) {
	names, err := fs.Glob(migrations, "migrations/*.sql")
	if err != nil {
		return nil, err
	}
	var ms []migration
	for _, n := range names {
		base := path.Base(n)
		v, err := strconv.Atoi(strings.SplitN(base, "_", 2)[0])
		if err != nil {
			return nil, fmt.Errorf("migration %s: the name must start with its version number", base)
		}
		b, err := migrations.ReadFile(n)
		if err != nil {
			return nil, err
		}
		ms = append(ms, migration{version: v, name: base, sql: string(b)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].version < ms[j].version })
	for i, m := range ms {
		if m.version != i+1 {
			return nil, fmt.Errorf("migration %s: versions must run 1, 2, 3... without gaps", m.name)
		}
	}
	return ms, nil
}

// SchemaVersion is the newest schema this build knows.
func SchemaVersion() int {
	ms, _ := loadMigrations()
	return len(ms)
}

// migrate applies the missing migrations, each in its own transaction, on
// one connection holding the advisory lock.
func (s *Store) migrate(ctx context.Context) error {
	ms, err := loadMigrations()
	if err != nil {
		return err
	}
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("failed to connect to the record store: %w", unavailable(err))
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", int64(migrationLock)); err != nil {
		return fmt.Errorf("failed to lock the schema for migration: %w", err)
	}
	defer conn.Exec(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock($1)", int64(migrationLock))
	if _, err := conn.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version integer PRIMARY KEY,
		name text NOT NULL,
		applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return fmt.Errorf("failed to create schema_migrations: %w", err)
	}
	var have int
	if err := conn.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM schema_migrations").Scan(&have); err != nil {
		return fmt.Errorf("failed to read the schema version: %w", err)
	}
	if have > len(ms) {
		return fmt.Errorf("the record store's schema is version %d, newer than this keyissuerd knows (%d): "+
			"an instance of a newer release migrated it; run that release, or restore the database", have, len(ms))
	}
	for _, m := range ms[have:] {
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, m.sql); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name)
			return err
		})
		if err != nil {
			return fmt.Errorf("failed to apply migration %s: %w", m.name, err)
		}
	}
	return nil
}

// unavailable marks errors that say the server cannot be reached, rather
// than that it refused the statement.
func unavailable(err error) error {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		// Class 08: connection exception; 57P0x: shutting down, cannot
		// connect now; 53: insufficient resources.
		if strings.HasPrefix(pe.Code, "08") || strings.HasPrefix(pe.Code, "57P") || strings.HasPrefix(pe.Code, "53") {
			return fmt.Errorf("%w: %w", store.ErrUnavailable, err)
		}
		return err
	}
	return fmt.Errorf("%w: %w", store.ErrUnavailable, err)
}

const columns = "unique_id, salt, customer_id, client_id, state, issued_at, expires_at, closed_at"

func scan(row pgx.Row) (store.Record, error) {
	var (
		r      store.Record
		state  string
		closed *time.Time
	)
	err := row.Scan(&r.UniqueID, &r.Salt, &r.CustomerID, &r.ClientID, &state, &r.IssuedAt, &r.ExpiresAt, &closed)
	if err != nil {
		return store.Record{}, err
	}
	r.State = store.State(state)
	r.IssuedAt, r.ExpiresAt = r.IssuedAt.UTC(), r.ExpiresAt.UTC()
	if closed != nil {
		r.ClosedAt = closed.UTC()
	}
	return r, nil
}

// nullTime is t, or NULL for the zero time.
func nullTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t
}

// ceilMicro rounds t up to PostgreSQL's precision, so that "before t"
// means the same as in Go.
func ceilMicro(t time.Time) time.Time {
	if tr := t.Truncate(time.Microsecond); !tr.Equal(t) {
		return tr.Add(time.Microsecond)
	}
	return t
}

func checkCtx(ctx context.Context) error { return ctx.Err() }

// Create stores a new record. It fails with ErrExists if the uniqueId is
// taken.
func (s *Store) Create(ctx context.Context, r store.Record) error {
	if err := checkCtx(ctx); err != nil {
		return fmt.Errorf("failed to create record %s: %w", r.UniqueID, err)
	}
	tag, err := s.pool.Exec(ctx, `INSERT INTO records (`+columns+`) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
		ON CONFLICT (unique_id) DO NOTHING`,
		r.UniqueID, r.Salt, r.CustomerID, r.ClientID, string(r.State), r.IssuedAt, r.ExpiresAt, nullTime(r.ClosedAt))
	if err != nil {
		return fmt.Errorf("failed to create record %s: %w", r.UniqueID, unavailable(err))
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("record %s: %w", r.UniqueID, store.ErrExists)
	}
	return nil
}

// Import stores many new records in one transaction (COPY): all or
// nothing, ErrExists if a uniqueId is taken.
func (s *Store) Import(ctx context.Context, recs []store.Record) error {
	if err := checkCtx(ctx); err != nil {
		return err
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		_, err := tx.CopyFrom(ctx, pgx.Identifier{"records"},
			[]string{"unique_id", "salt", "customer_id", "client_id", "state", "issued_at", "expires_at", "closed_at"},
			pgx.CopyFromSlice(len(recs), func(i int) ([]any, error) {
				r := recs[i]
				return []any{r.UniqueID, r.Salt, r.CustomerID, r.ClientID, string(r.State), r.IssuedAt, r.ExpiresAt, nullTime(r.ClosedAt)}, nil
			}))
		return err
	})
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "23505" { // unique_violation
		return fmt.Errorf("failed to import %d records: %w (%s)", len(recs), store.ErrExists, pe.Detail)
	}
	if err != nil {
		return fmt.Errorf("failed to import %d records: %w", len(recs), unavailable(err))
	}
	return nil
}

// Get returns the record for id, or ErrNotFound.
func (s *Store) Get(ctx context.Context, id string) (store.Record, error) {
	r, err := scan(s.pool.QueryRow(ctx, "SELECT "+columns+" FROM records WHERE unique_id = $1", id))
	if errors.Is(err, pgx.ErrNoRows) {
		return store.Record{}, fmt.Errorf("record %s: %w", id, store.ErrNotFound)
	}
	if err != nil {
		return store.Record{}, fmt.Errorf("failed to read record %s: %w", id, unavailable(err))
	}
	return r, nil
}

// Transition moves record id from state from to state to if and only if it
// is in state from, in one UPDATE: a compare-and-swap that holds across
// every instance sharing the database. Leaving the active states sets
// ClosedAt to at. It returns the new record, ErrNotFound, or a
// *StateError holding the record as it is.
func (s *Store) Transition(ctx context.Context, id string, from, to store.State, at time.Time) (store.Record, error) {
	return s.transition(ctx, id, from, to, at, "")
}

// transition is Transition, recording in claimed_by who claimed the key
// when to is consuming.
func (s *Store) transition(ctx context.Context, id string, from, to store.State, at time.Time, by string) (store.Record, error) {
	if err := checkCtx(ctx); err != nil {
		return store.Record{}, fmt.Errorf("failed to move record %s from %s to %s: %w", id, from, to, err)
	}
	r, err := scan(s.pool.QueryRow(ctx, `UPDATE records SET state = $3,
			closed_at = CASE WHEN $4 THEN $5 ELSE closed_at END,
			claimed_by = CASE WHEN $3 = 'consuming' THEN $6 ELSE claimed_by END
		WHERE unique_id = $1 AND state = $2
		RETURNING `+columns,
		id, string(from), string(to), !to.Active(), at.UTC(), by))
	if err == nil {
		return r, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return store.Record{}, fmt.Errorf("failed to move record %s from %s to %s: %w", id, from, to, unavailable(err))
	}
	cur, err := s.Get(ctx, id)
	if err != nil {
		return store.Record{}, err
	}
	return cur, &store.StateError{Current: cur, Want: from}
}

// Settle is Transition without a result, committed without waiting for
// the commit to be flushed (synchronous_commit off for its transaction
// alone): one round trip, no flush. Like every commit it is seen at once by
// every instance; what a crash of PostgreSQL may lose is its durability,
// and then the record is back in state from, as a crash of the instance
// would leave it, which the reaper or reconciliation finishes. Should the
// write fail (bounded by Options.SettleTimeout), the same holds.
func (s *Store) Settle(id string, from, to store.State, at time.Time) {
	ctx, cancel := context.WithTimeout(context.Background(), s.settleTimeout)
	defer cancel()
	s.execUnflushed(ctx, `UPDATE records SET state = $3, closed_at = CASE WHEN $4 THEN $5 ELSE closed_at END
		WHERE unique_id = $1 AND state = $2`, id, string(from), string(to), !to.Active(), at.UTC())
}

// execUnflushed runs one statement in a transaction of its own that
// commits without waiting for the write-ahead log to be flushed
// (synchronous_commit off, local to that transaction: one pipeline is one
// implicit transaction). Every instance sees the commit at once; a crash
// of PostgreSQL may lose it, until a later flushed commit covers it.
func (s *Store) execUnflushed(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	b := &pgx.Batch{}
	b.Queue("SELECT set_config('synchronous_commit', 'off', true)")
	b.Queue(sql, args...)
	br := s.pool.SendBatch(ctx, b)
	_, err := br.Exec()
	var tag pgconn.CommandTag
	if err == nil {
		tag, err = br.Exec()
	}
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	return tag, err
}

// Active returns up to limit records (all if limit <= 0) in an active state
// whose expiry is before the given time, earliest first.
func (s *Store) Active(ctx context.Context, before time.Time, limit int) ([]store.Record, error) {
	q := "SELECT " + columns + ` FROM records WHERE state IN ('issued', 'consuming') AND expires_at < $1
		ORDER BY expires_at, unique_id`
	args := []any{ceilMicro(before)}
	if limit > 0 {
		q += " LIMIT $2"
		args = append(args, limit)
	}
	return s.query(ctx, "failed to scan active records", q, args...)
}

func (s *Store) query(ctx context.Context, what, q string, args ...any) ([]store.Record, error) {
	rows, err := s.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, unavailable(err))
	}
	defer rows.Close()
	var out []store.Record
	for rows.Next() {
		r, err := scan(rows)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", what, unavailable(err))
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", what, unavailable(err))
	}
	return out, nil
}

// Prune deletes up to limit (all if limit <= 0) finished records that
// closed before the given time, and returns how many it deleted.
func (s *Store) Prune(ctx context.Context, before time.Time, limit int) (int, error) {
	q := `DELETE FROM records WHERE unique_id IN (SELECT unique_id FROM records
		WHERE state NOT IN ('issued', 'consuming') AND closed_at < $1 ORDER BY closed_at, unique_id`
	args := []any{ceilMicro(before)}
	if limit > 0 {
		q += " LIMIT $2"
		args = append(args, limit)
	}
	tag, err := s.pool.Exec(ctx, q+")", args...)
	if err != nil {
		return 0, fmt.Errorf("failed to prune records: %w", unavailable(err))
	}
	return int(tag.RowsAffected()), nil
}

// FirstUse reports whether digest is seen for the first time (or its
// previous use has expired), remembering it until expires, for every
// instance sharing the database: the public API's replay guard
// (publicapi.ReplayGuard) in a cluster. Concurrent calls with one digest,
// from any instances, have exactly one first.
//
// It commits without waiting for the flush (synchronous_commit off for its
// own transaction): every instance sees the digest at once, and the apply
// that follows makes it durable before it is answered, since the issue's
// commit waits for the write-ahead log to be flushed up to its own commit
// record, and so past every commit made before it, this one included
// (BENCHMARKS.md, row 8: one flushed commit per apply, not two). What a
// crash of PostgreSQL can lose is the digest of a request that was not
// issued a key (refused, or failed before the issue): that request could
// then be served once after the crash, within its request-time window.
func (s *Store) FirstUse(ctx context.Context, digest []byte, expires time.Time) (bool, error) {
	tag, err := s.execUnflushed(ctx, `INSERT INTO replay AS r (digest, expires_at) VALUES ($1, $2)
		ON CONFLICT (digest) DO UPDATE SET expires_at = EXCLUDED.expires_at WHERE r.expires_at < now()`, digest, expires)
	if err != nil {
		return false, fmt.Errorf("failed to check the replay cache: %w", unavailable(err))
	}
	return tag.RowsAffected() == 1, nil
}

// PruneReplay deletes up to limit expired replay digests.
func (s *Store) PruneReplay(ctx context.Context, limit int) (int, error) {
	tag, err := s.pool.Exec(ctx, `DELETE FROM replay WHERE digest IN
		(SELECT digest FROM replay WHERE expires_at < now() LIMIT $1)`, limit)
	if err != nil {
		return 0, unavailable(err)
	}
	return int(tag.RowsAffected()), nil
}
