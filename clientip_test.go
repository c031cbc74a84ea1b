package main

import (
	"net/http/httptest"
	"net/netip"
	"testing"
)

func TestClientKey(t *testing.T) {
	trusted := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")}
	for _, tc := range []struct {
		peer string
		xff  []string
		want string
	}{
		{"1.2.3.4:5678", nil, "1.2.3.4"},
		{"1.2.3.4:5678", []string{"9.9.9.9"}, "1.2.3.4"}, // untrusted peer: header ignored
		{"[::ffff:1.2.3.4]:80", nil, "1.2.3.4"},
		{"[2001:db8:1:2:aaaa::1]:80", nil, "2001:db8:1:2::/64"},
		{"[2001:db8:1:2:bbbb::2]:80", nil, "2001:db8:1:2::/64"},
		{"[2001:db8:1:3::1]:80", nil, "2001:db8:1:3::/64"},
		{"10.0.0.1:80", nil, "10.0.0.1"}, // a trusted peer with no header is the client
		{"10.0.0.1:80", []string{"9.9.9.9"}, "9.9.9.9"},
		{"10.0.0.1:80", []string{"6.6.6.6, 9.9.9.9, 10.1.1.1"}, "9.9.9.9"},   // right to left past trusted hops
		{"10.0.0.1:80", []string{"6.6.6.6", "9.9.9.9, 10.1.1.1"}, "9.9.9.9"}, // several header lines
		{"10.0.0.1:80", []string{"10.2.2.2, 10.1.1.1"}, "10.2.2.2"},          // all trusted: the leftmost
		{"10.0.0.1:80", []string{"9.9.9.9, bogus"}, "10.0.0.1"},              // unparseable: the peer
		{"10.0.0.1:80", []string{"9.9.9.9:1234"}, "9.9.9.9"},
		{"10.0.0.1:80", []string{"::ffff:9.9.9.9"}, "9.9.9.9"},
		{"10.0.0.1:80", []string{"[2001:db8::5]:443"}, "2001:db8::/64"},
		{"10.0.0.1:80", []string{"[2001:db8::5]"}, "2001:db8::/64"},
		{"10.0.0.1:80", []string{"[2001:db8::5"}, "10.0.0.1"},
		{"[fd00::1]:80", []string{"2001:db8:0:1::7"}, "2001:db8:0:1::/64"},
		{"[::ffff:10.0.0.1]:80", []string{"9.9.9.9"}, "9.9.9.9"}, // a mapped peer is trusted as IPv4
	} {
		r := httptest.NewRequest("POST", "/api/metrics", nil)
		r.RemoteAddr = tc.peer
		for _, v := range tc.xff {
			r.Header.Add("X-Forwarded-For", v)
		}
		if got := clientKey(r, trusted); got != tc.want {
			t.Errorf("clientKey(peer %s, X-Forwarded-For %q) = %s, want %s", tc.peer, tc.xff, got, tc.want)
		}
	}
}
