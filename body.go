package main

import (
	"io"
	"math/bits"
	"sync"
)

// bodyBuffers holds the buffers request bodies are read into, by size
// class (powers of two from 4 KiB), for reuse by later requests. A body is
// read into the smallest class and moves up a class only when the one it
// is in is full, so a slow client holds at most about twice what it has
// sent, and a busy ingest allocates (and zeroes) no new buffers.
type bodyBuffers struct {
	classes [numBodyClasses]sync.Pool
}

const (
	minBodyClass   = 9 // 512 bytes
	numBodyClasses = 31 - minBodyClass + 1
)

// read reads r to its end. The caller passes the body to release once
// done with it and with anything that points into it.
func (p *bodyBuffers) read(r io.Reader) ([]byte, error) {
	buf := p.get(0)
	for {
		if len(buf) == cap(buf) {
			next := append(p.get(p.class(cap(buf))+1), buf...)
			p.release(buf)
			buf = next
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			p.release(buf)
			return nil, err
		}
	}
}

// class is the size class of a buffer of capacity c, a power of two.
func (p *bodyBuffers) class(c int) int { return bits.Len(uint(c)) - 1 - minBodyClass }

func (p *bodyBuffers) get(class int) []byte {
	if class >= numBodyClasses {
		panic("bodyBuffers: body beyond 2 GiB")
	}
	if b, ok := p.classes[class].Get().(*[]byte); ok {
		return (*b)[:0]
	}
	return make([]byte, 0, 1<<(minBodyClass+class))
}

func (p *bodyBuffers) release(b []byte) {
	b = b[:0]
	p.classes[p.class(cap(b))].Put(&b)
}
