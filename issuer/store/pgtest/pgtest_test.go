package pgtest_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/keyissuer/keyissuer/issuer/store/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func connect(t *testing.T, db pgtest.Database) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(context.Background(), db.DSN+" password="+db.Password)
	if err != nil {
		t.Fatalf("connect(%s) = %v", db.DSN, err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func TestDatabasesAreFreshAndApart(t *testing.T) {
	ctx := context.Background()
	a, b := pgtest.NewDatabase(t), pgtest.NewDatabase(t)
	if a.Name == b.Name {
		t.Fatalf("two databases named %s", a.Name)
	}
	ca, cb := connect(t, a), connect(t, b)
	if _, err := ca.Exec(ctx, "CREATE TABLE t (x int)"); err != nil {
		t.Fatal(err)
	}
	if _, err := cb.Exec(ctx, "CREATE TABLE t (x int)"); err != nil {
		t.Errorf("a table made in one database is in the other: %v", err)
	}
}

func TestPasswordRequired(t *testing.T) {
	db := pgtest.NewDatabase(t)
	c, err := pgx.Connect(context.Background(), db.DSN+" password=wrong")
	if err == nil {
		c.Close(context.Background())
		t.Fatal("connected with a wrong password")
	}
}

func TestStopStart(t *testing.T) {
	ctx := context.Background()
	db := pgtest.NewDatabase(t)
	c := connect(t, db)
	if _, err := c.Exec(ctx, "CREATE TABLE t (x int); INSERT INTO t VALUES (7)"); err != nil {
		t.Fatal(err)
	}
	db.Server.Stop(t)
	if err := c.Ping(ctx); err == nil {
		t.Fatal("a connection to a stopped server still answers")
	}
	db.Server.Start(t)
	c = connect(t, db)
	var x int
	if err := c.QueryRow(ctx, "SELECT x FROM t").Scan(&x); err != nil || x != 7 {
		t.Errorf("after a restart: %d, %v; want the row written before", x, err)
	}
}
