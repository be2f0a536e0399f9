// Package jsonbody parses request bodies of keyissuer's APIs, where every
// field is a JSON string. encoding/json alone is too lenient for a public
// endpoint: it accepts duplicate keys (the last wins), replaces invalid
// UTF-8, and turns a number into a string field's error only on some paths.
// Parse is strict and says exactly what is wrong.
package jsonbody

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"
)

// Error is a malformed body. Its message is safe to return to the caller:
// it names fields, never echoes values.
type Error struct{ Msg string }

func (e *Error) Error() string { return e.Msg }

func errorf(format string, args ...any) error {
	return &Error{Msg: fmt.Sprintf(format, args...)}
}

// Parse reads body as one JSON object and returns the values of the named
// fields that are present. Each named field must be a JSON string; other
// fields are ignored, whatever their type. Duplicate keys, invalid UTF-8
// and trailing data are errors.
func Parse(body []byte, fields ...string) (map[string]string, error) {
	if len(bytes.TrimSpace(body)) == 0 {
		return nil, errorf("the body is empty; send a JSON object")
	}
	if !utf8.Valid(body) {
		return nil, errorf("the body is not valid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, syntaxErr(err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errorf("the body must be a JSON object")
	}
	want := make(map[string]bool, len(fields))
	for _, f := range fields {
		want[f] = true
	}
	out := map[string]string{}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, syntaxErr(err)
		}
		key := tok.(string) // object keys are always strings
		if seen[key] {
			return nil, errorf("duplicate field %q", printable(key))
		}
		seen[key] = true
		if !want[key] {
			var skip json.RawMessage
			if err := dec.Decode(&skip); err != nil {
				return nil, syntaxErr(err)
			}
			continue
		}
		tok, err = dec.Token()
		if err != nil {
			return nil, syntaxErr(err)
		}
		s, ok := tok.(string)
		if !ok {
			return nil, errorf("field %q must be a JSON string", key)
		}
		out[key] = s
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, syntaxErr(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errorf("unexpected data after the JSON object")
	}
	return out, nil
}

func syntaxErr(err error) error {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return errorf("invalid JSON at byte %d: %s", se.Offset, se.Error())
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return errorf("invalid JSON: the body ends too early")
	}
	return errorf("invalid JSON: %s", err.Error())
}

// printable bounds what of a caller's key is echoed back.
func printable(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}
