package jsonbody_test

import (
	"encoding/json"
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/keyissuer/keyissuer/server/jsonbody"
)

// secret is the value the table puts into fields; no error may echo it.
const secret = "S3CRET-VALUE"

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		body    string
		fields  []string
		want    map[string]string
		wantErr string // a substring of the error; "" means no error
	}{
		{
			name:   "valid object",
			body:   `{"a":"` + secret + `","b":"2"}`,
			fields: []string{"a", "b"},
			want:   map[string]string{"a": secret, "b": "2"},
		},
		{
			name:   "surrounding whitespace",
			body:   " \r\n\t{ \"a\" : \"1\" } \n",
			fields: []string{"a"},
			want:   map[string]string{"a": "1"},
		},
		{
			name:   "absent field is left out",
			body:   `{"a":"1"}`,
			fields: []string{"a", "b"},
			want:   map[string]string{"a": "1"},
		},
		{
			name:   "empty object",
			body:   `{}`,
			fields: []string{"a"},
			want:   map[string]string{},
		},
		{
			name: "no fields asked",
			body: `{"a":1,"b":"x"}`,
			want: map[string]string{},
		},
		{
			name:   "empty string value",
			body:   `{"a":""}`,
			fields: []string{"a"},
			want:   map[string]string{"a": ""},
		},
		{
			name:   "escapes are decoded",
			body:   `{"a":"\u0041\n\"\\\/\u00e9\ud83d\ude00"}`,
			fields: []string{"a"},
			want:   map[string]string{"a": "A\n\"\\/é😀"},
		},
		{
			// encoding/json replaces a lone surrogate escape with U+FFFD,
			// so the value stays valid UTF-8.
			name:   "lone surrogate escape becomes U+FFFD",
			body:   `{"a":"x\ud800y"}`,
			fields: []string{"a"},
			want:   map[string]string{"a": "x\uFFFDy"},
		},
		{
			name:   "non-ASCII UTF-8 value",
			body:   `{"a":"密码-пароль"}`,
			fields: []string{"a"},
			want:   map[string]string{"a": "密码-пароль"},
		},
		{
			name:   "escaped key matches the field",
			body:   `{"\u0061":"1"}`,
			fields: []string{"a"},
			want:   map[string]string{"a": "1"},
		},
		{
			// Keys match exactly: encoding/json's case folding does not
			// apply, so "A" is just an unknown field.
			name:   "key match is case sensitive",
			body:   `{"A":"1"}`,
			fields: []string{"a"},
			want:   map[string]string{},
		},
		{
			name:   "unknown fields of every type are ignored",
			body:   `{"n":1.5e300,"t":true,"f":false,"z":null,"o":{"x":[1,{"y":null}]},"arr":[1,"2",[3]],"s":"str","a":"1"}`,
			fields: []string{"a"},
			want:   map[string]string{"a": "1"},
		},
		{
			// Only top-level keys are checked for duplicates: an ignored
			// field is skipped as raw JSON, duplicates inside it and all.
			name:   "nested unknown object with duplicate keys is accepted",
			body:   `{"o":{"x":1,"x":2},"a":"1"}`,
			fields: []string{"a"},
			want:   map[string]string{"a": "1"},
		},
		{
			name:    "known field as number",
			body:    `{"a":12345}`,
			fields:  []string{"a"},
			wantErr: `field "a" must be a JSON string`,
		},
		{
			name:    "known field as bool",
			body:    `{"a":true}`,
			fields:  []string{"a"},
			wantErr: `field "a" must be a JSON string`,
		},
		{
			name:    "known field as null",
			body:    `{"a":null}`,
			fields:  []string{"a"},
			wantErr: `field "a" must be a JSON string`,
		},
		{
			name:    "known field as object",
			body:    `{"a":{"v":"` + secret + `"}}`,
			fields:  []string{"a"},
			wantErr: `field "a" must be a JSON string`,
		},
		{
			name:    "known field as array",
			body:    `{"a":["` + secret + `"]}`,
			fields:  []string{"a"},
			wantErr: `field "a" must be a JSON string`,
		},
		{
			name:    "duplicate known key",
			body:    `{"a":"` + secret + `","a":"2"}`,
			fields:  []string{"a"},
			wantErr: `duplicate field "a"`,
		},
		{
			name:    "duplicate known key through an escape",
			body:    `{"a":"` + secret + `","\u0061":"2"}`,
			fields:  []string{"a"},
			wantErr: `duplicate field "a"`,
		},
		{
			name:    "duplicate unknown key",
			body:    `{"u":"` + secret + `","u":1,"a":"1"}`,
			fields:  []string{"a"},
			wantErr: `duplicate field "u"`,
		},
		{
			name:    "invalid UTF-8 in a value",
			body:    "{\"a\":\"" + secret + "\xff\"}",
			fields:  []string{"a"},
			wantErr: "not valid UTF-8",
		},
		{
			name:    "invalid UTF-8 in an ignored field",
			body:    "{\"u\":\"\xc3\x28\",\"a\":\"1\"}",
			fields:  []string{"a"},
			wantErr: "not valid UTF-8",
		},
		{
			name:    "trailing object",
			body:    `{"a":"` + secret + `"}{}`,
			fields:  []string{"a"},
			wantErr: "unexpected data after the JSON object",
		},
		{
			name:    "trailing garbage",
			body:    `{"a":"` + secret + `"} x`,
			fields:  []string{"a"},
			wantErr: "unexpected data after the JSON object",
		},
		{
			name:    "trailing string",
			body:    `{} "` + secret + `"`,
			fields:  []string{"a"},
			wantErr: "unexpected data after the JSON object",
		},
		{
			name:    "trailing comma",
			body:    `{"a":"` + secret + `",}`,
			fields:  []string{"a"},
			wantErr: "invalid JSON",
		},
		{
			name:    "leading comma",
			body:    `{,"a":"1"}`,
			fields:  []string{"a"},
			wantErr: "invalid JSON",
		},
		{
			name:    "missing comma",
			body:    `{"a":"` + secret + `" "b":"2"}`,
			fields:  []string{"a", "b"},
			wantErr: "invalid JSON",
		},
		{
			name:    "non-string key",
			body:    `{1:"` + secret + `"}`,
			fields:  []string{"a"},
			wantErr: "invalid JSON",
		},
		{
			name:    "control character in a value",
			body:    "{\"a\":\"" + secret + "\x01\"}",
			fields:  []string{"a"},
			wantErr: "invalid JSON",
		},
		{
			name:    "bad escape in a value",
			body:    `{"a":"` + secret + `\q"}`,
			fields:  []string{"a"},
			wantErr: "invalid JSON",
		},
		{
			name:    "unterminated value",
			body:    `{"a":"` + secret,
			fields:  []string{"a"},
			wantErr: "invalid JSON",
		},
		{
			name:    "missing closing brace",
			body:    `{"a":"` + secret + `"`,
			fields:  []string{"a"},
			wantErr: "invalid JSON",
		},
		{
			name:    "object closed with a bracket",
			body:    `{"a":"` + secret + `"]`,
			fields:  []string{"a"},
			wantErr: "invalid JSON",
		},
		{
			name:    "broken ignored field",
			body:    `{"u":[1,,2],"a":"1"}`,
			fields:  []string{"a"},
			wantErr: "invalid JSON",
		},
		{
			name:    "single quotes",
			body:    `{'a':'1'}`,
			fields:  []string{"a"},
			wantErr: "invalid JSON",
		},
		{
			name:    "empty body",
			body:    "",
			fields:  []string{"a"},
			wantErr: "the body is empty",
		},
		{
			name:    "whitespace body",
			body:    " \n\t ",
			fields:  []string{"a"},
			wantErr: "the body is empty",
		},
		{
			name:    "top-level array",
			body:    `[{"a":"` + secret + `"}]`,
			fields:  []string{"a"},
			wantErr: "must be a JSON object",
		},
		{
			name:    "top-level string",
			body:    `"` + secret + `"`,
			fields:  []string{"a"},
			wantErr: "must be a JSON object",
		},
		{
			name:    "top-level number",
			body:    `42`,
			fields:  []string{"a"},
			wantErr: "must be a JSON object",
		},
		{
			name:    "top-level null",
			body:    `null`,
			fields:  []string{"a"},
			wantErr: "must be a JSON object",
		},
		{
			name:    "byte order mark",
			body:    "\ufeff{\"a\":\"1\"}",
			fields:  []string{"a"},
			wantErr: "invalid JSON",
		},
		{
			name:    "too deeply nested ignored field",
			body:    `{"u":` + strings.Repeat("[", 20000) + strings.Repeat("]", 20000) + `}`,
			fields:  []string{"a"},
			wantErr: "invalid JSON",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := jsonbody.Parse([]byte(tt.body), tt.fields...)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("Parse(%q) = %v, want an error containing %q", tt.body, got, tt.wantErr)
				}
				checkError(t, err, tt.wantErr)
				if got != nil {
					t.Errorf("Parse returned %v with its error, want nil", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.body, err)
			}
			if !maps.Equal(got, tt.want) {
				t.Errorf("Parse(%q) = %v, want %v", tt.body, got, tt.want)
			}
		})
	}
}

// checkError checks that err is a *jsonbody.Error containing want and
// echoing no field value.
func checkError(tb testing.TB, err error, want string) {
	tb.Helper()
	var je *jsonbody.Error
	if !errors.As(err, &je) {
		tb.Errorf("error %q is a %T, want *jsonbody.Error", err, err)
	}
	msg := err.Error()
	if !strings.Contains(msg, want) {
		tb.Errorf("error %q does not contain %q", msg, want)
	}
	if strings.Contains(msg, secret) {
		tb.Errorf("error %q echoes a field value", msg)
	}
}

// TestParseDuplicateKeyIsBounded checks that a long duplicate key is not
// echoed whole.
func TestParseDuplicateKeyIsBounded(t *testing.T) {
	key := strings.Repeat("k", 1000)
	_, err := jsonbody.Parse([]byte(`{"`+key+`":1,"`+key+`":2}`), "a")
	if err == nil {
		t.Fatal("Parse accepted a duplicate key")
	}
	if len(err.Error()) > 200 {
		t.Errorf("error is %d bytes long; the key should be truncated: %.80q...", len(err.Error()), err)
	}
}

// fuzzFields are the fields FuzzParse asks for: the real APIs' fields, and
// a short one that random inputs hit often.
var fuzzFields = []string{"a", "customerId", "uniqueId", "ciphertext"}

// FuzzParse checks that Parse never panics, that what it accepts is valid
// JSON whose requested fields are the strings encoding/json reads, and that
// it rejects valid JSON only for the documented reasons.
func FuzzParse(f *testing.F) {
	f.Add([]byte(`{"a":"1"}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		got, err := jsonbody.Parse(body, fuzzFields...)
		if err != nil {
			var je *jsonbody.Error
			if !errors.As(err, &je) {
				t.Fatalf("error %q is a %T, want *jsonbody.Error", err, err)
			}
			if got != nil {
				t.Fatalf("Parse returned %v with its error %q", got, err)
			}
			if json.Valid(body) && utf8.Valid(body) {
				msg := err.Error()
				ok := false
				for _, p := range []string{"duplicate field ", "field ", "the body must be a JSON object"} {
					ok = ok || strings.HasPrefix(msg, p)
				}
				if !ok {
					t.Fatalf("valid JSON %q rejected with %q", body, msg)
				}
			}
			return
		}
		if !json.Valid(body) {
			t.Fatalf("Parse accepted invalid JSON %q", body)
		}
		if !utf8.Valid(body) {
			t.Fatalf("Parse accepted invalid UTF-8 %q", body)
		}
		var all map[string]json.RawMessage
		if err := json.Unmarshal(body, &all); err != nil {
			t.Fatalf("Parse accepted %q, which encoding/json cannot read as an object: %v", body, err)
		}
		for k, v := range got {
			if !utf8.ValidString(v) {
				t.Fatalf("field %q = %q is not valid UTF-8", k, v)
			}
			raw, ok := all[k]
			if !ok {
				t.Fatalf("Parse returned field %q, which the body lacks", k)
			}
			var s string
			if err := json.Unmarshal(raw, &s); err != nil || s != v {
				t.Fatalf("field %q = %q, encoding/json reads %s as %q (%v)", k, v, raw, s, err)
			}
		}
		for _, k := range fuzzFields {
			if _, ok := got[k]; !ok {
				if raw, ok := all[k]; ok {
					t.Fatalf("field %q (%s) is in the body but not returned", k, raw)
				}
			}
		}
		for k := range got {
			if !slices.Contains(fuzzFields, k) {
				t.Fatalf("Parse returned unrequested field %q", k)
			}
		}
	})
}
