package main

import (
	"bytes"
	"io"
	"math/rand/v2"
	"testing"
	"testing/iotest"
)

// TestBodyBuffersRead reads bodies of random sizes, around every class
// boundary, through readers that return few bytes at a time, with
// buffers going back to the pool and out again between reads.
func TestBodyBuffersRead(t *testing.T) {
	var p bodyBuffers
	rng := rand.New(rand.NewPCG(1, 2))
	sizes := []int{0, 1, 511, 512, 513, 1023, 1024, 1025, 4096, 100_000}
	for range 200 {
		sizes = append(sizes, rng.IntN(70_000))
	}
	for _, n := range sizes {
		want := make([]byte, n)
		for i := range want {
			want[i] = byte(rng.Uint32())
		}
		var r io.Reader = bytes.NewReader(want)
		if rng.IntN(2) == 0 {
			r = iotest.HalfReader(r)
		}
		got, err := p.read(r)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("read of %d bytes = %d bytes, %v", n, len(got), err)
		}
		if c := cap(got); c < 512 || c&(c-1) != 0 || n > 512 && c > 2*n {
			t.Fatalf("read of %d bytes into a buffer of %d, want a power of two from 512, at most twice the body", n, c)
		}
		clear(got) // what the next body's reader gets must not matter
		p.release(got)
	}
	if _, err := p.read(iotest.ErrReader(io.ErrUnexpectedEOF)); err != io.ErrUnexpectedEOF {
		t.Fatalf("read of a failing reader = %v, want its error", err)
	}
}
