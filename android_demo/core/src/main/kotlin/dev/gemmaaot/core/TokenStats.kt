package dev.gemmaaot.core

/**
 * Speed of one reply: time to first token (prompt processing) and decode tokens/s after it.
 * The clock is injected (nanoseconds) so the arithmetic is tested exactly.
 */
class TokenStats(private val clock: () -> Long = System::nanoTime) {
    private var start = 0L
    private var first = 0L
    private var last = 0L
    var tokens = 0
        private set

    fun begin() { start = clock(); first = 0L; last = 0L; tokens = 0 }

    /** One generated piece that carried [count] tokens (1 unless the engine batches them). */
    fun token(count: Int = 1) {
        val now = clock()
        if (tokens == 0) first = now
        last = now
        tokens += count
    }

    /** Seconds from begin() to the first token; null before it. */
    val timeToFirstToken: Double? get() = if (tokens == 0) null else (first - start) / 1e9

    /** Tokens per second after the first one (decode speed); null until two tokens arrived. */
    val decodeTokensPerSecond: Double?
        get() = if (tokens < 2 || last == first) null else (tokens - 1) / ((last - first) / 1e9)

    fun summary(): String {
        val ttft = timeToFirstToken ?: return "no tokens yet"
        val rate = decodeTokensPerSecond
        return String.format(java.util.Locale.ROOT, "%d tokens, first after %.2f s%s",
            tokens, ttft, if (rate == null) "" else String.format(java.util.Locale.ROOT, ", %.1f tok/s", rate))
    }
}
