package dev.gemmaaot.core

/**
 * Turns streamed pieces into displayable text.
 *
 * Pieces may end inside a UTF-8 sequence (a token can be part of a multi-byte character): those
 * bytes wait for the rest. Text that could be the start of a stop string is held back until it
 * can no longer become one; when a stop string appears, everything from it on is dropped and
 * [stopped] turns true. Invariant: [text] only grows, and never contains a stop string.
 */
class StreamText(stopStrings: List<String> = emptyList()) {
    private val stops = stopStrings.filter { it.isNotEmpty() }
    private val pendingBytes = java.io.ByteArrayOutputStream()
    private val held = StringBuilder()       // decoded, not yet safe to show
    private val shown = StringBuilder()

    val text: String get() = shown.toString()
    var stopped = false
        private set

    /** Adds raw bytes; returns the newly displayable text ("" if none). */
    fun addBytes(bytes: ByteArray): String {
        if (stopped) return ""
        pendingBytes.write(bytes)
        val all = pendingBytes.toByteArray()
        val complete = completeUtf8Prefix(all)
        pendingBytes.reset()
        pendingBytes.write(all, complete, all.size - complete)
        return addText(String(all, 0, complete, Charsets.UTF_8))
    }

    /** Adds already-decoded text; returns the newly displayable text. */
    fun addText(piece: String): String {
        if (stopped) return ""
        held.append(piece)
        for (s in stops) {
            val at = held.indexOf(s)
            if (at >= 0) {
                held.setLength(at)
                stopped = true
            }
        }
        val keep = if (stopped) 0 else heldBack()
        val out = held.substring(0, held.length - keep)
        held.delete(0, held.length - keep)
        shown.append(out)
        return out
    }

    /** End of stream: shows what was held (an incomplete UTF-8 tail becomes U+FFFD). */
    fun finish(): String {
        if (stopped) return ""
        val tail = String(pendingBytes.toByteArray(), Charsets.UTF_8)
        pendingBytes.reset()
        held.append(tail)
        val out = held.toString()
        held.setLength(0)
        shown.append(out)
        return out
    }

    /** Length of the longest suffix of [held] that is a proper prefix of some stop string. */
    private fun heldBack(): Int {
        var best = 0
        for (s in stops) {
            for (n in minOf(s.length - 1, held.length) downTo 1) {
                if (n <= best) break
                if (held.regionMatches(held.length - n, s, 0, n)) { best = n; break }
            }
        }
        return best
    }

    companion object {
        /** How many leading bytes form complete UTF-8 sequences (invalid bytes count as complete). */
        fun completeUtf8Prefix(b: ByteArray): Int {
            var i = b.size
            // look back at most 3 bytes for the lead byte of a sequence that is cut off
            var back = 0
            while (back < 3 && i - back - 1 >= 0) {
                val c = b[i - back - 1].toInt() and 0xff
                if (c and 0xC0 != 0x80) {                          // a lead byte or ASCII
                    val need = when {
                        c and 0x80 == 0 -> 1
                        c and 0xE0 == 0xC0 -> 2
                        c and 0xF0 == 0xE0 -> 3
                        c and 0xF8 == 0xF0 -> 4
                        else -> 1
                    }
                    return if (back + 1 < need) i - back - 1 else i
                }
                back++
            }
            return i
        }
    }
}
