package main

// The client-address logic: who a request counts against for the rate
// limit. Values in, values out: no I/O, no clock, no logging.

import (
	"net/http"
	"net/netip"
	"strings"
)

// clientKey is who a request counts against: the TCP peer, or, when the
// peer is a trusted proxy, the first untrusted address of X-Forwarded-For
// read from the right. An IPv6 client counts as its /64, since one host
// commonly holds a whole /64; an IPv4-mapped address as the IPv4 one.
func clientKey(r *http.Request, trusted []netip.Prefix) string {
	peer, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr // not TCP (a test's fake address): use it as is
	}
	client := peer.Addr().Unmap()
	if inAny(client, trusted) {
		client = forwardedClient(r.Header.Values("X-Forwarded-For"), trusted, client)
	}
	if client.Is6() {
		p, _ := client.Prefix(64)
		return p.String()
	}
	return client.String()
}

// forwardedClient walks X-Forwarded-For from the right, past trusted hops,
// to the first untrusted address. An entry that does not parse means the
// header cannot be believed, so the peer itself is the client. When every
// hop is trusted, the leftmost is the client.
func forwardedClient(headers []string, trusted []netip.Prefix, peer netip.Addr) netip.Addr {
	var hops []string
	for _, h := range headers {
		hops = append(hops, strings.Split(h, ",")...)
	}
	client := peer
	for i := len(hops) - 1; i >= 0; i-- {
		addr, ok := parseHop(strings.TrimSpace(hops[i]))
		if !ok {
			return peer
		}
		client = addr
		if !inAny(addr, trusted) {
			break
		}
	}
	return client
}

// parseHop reads one X-Forwarded-For entry: an address, possibly with a
// port ("1.2.3.4:5678", "[2001:db8::1]:443") or brackets ("[2001:db8::1]").
func parseHop(s string) (netip.Addr, bool) {
	if len(s) > 2 && s[0] == '[' && s[len(s)-1] == ']' {
		s = s[1 : len(s)-1]
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return a.Unmap(), true
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr().Unmap(), true
	}
	return netip.Addr{}, false
}

func inAny(a netip.Addr, prefixes []netip.Prefix) bool {
	for _, p := range prefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
