package dev.gemmaaot.core

import kotlin.test.Test
import kotlin.test.assertEquals
import kotlin.test.assertFailsWith
import kotlin.test.assertNull
import kotlin.test.assertTrue

class SettingsAndStatsTest {
    @Test
    fun defaultsAreValid() = assertEquals(emptyList(), SamplerSettings().problems())

    @Test
    fun everyProblemIsNamed() {
        val p = SamplerSettings(temperature = -1.0, topK = 0, topP = 1.5, maxNewTokens = 0).problems(2048)
        assertEquals(listOf(
            "temperature must be between 0 and 2 (0 is greedy), got -1.0",
            "top-k must be at least 1, got 0",
            "top-p must be in (0, 1], got 1.5",
            "max new tokens must be between 1 and 2047, got 0"), p)
        assertTrue(SamplerSettings(temperature = Double.NaN).problems().single().startsWith("temperature"))
        val e = assertFailsWith<IllegalArgumentException> { SamplerSettings(topK = -3).validated() }
        assertEquals("top-k must be at least 1, got -3", e.message)
    }

    @Test
    fun parsingTheSettingsScreen() {
        val (ok, none) = SamplerSettings.parse(" 0.7", "64", "0.9", "256")
        assertEquals(SamplerSettings(0.7, 64, 0.9, 256), ok)
        assertEquals(emptyList(), none)
        val (bad, errors) = SamplerSettings.parse("warm", "4.5", "0.9", "")
        assertNull(bad)
        assertEquals(listOf("temperature is not a number: 'warm'", "top-k is not a whole number: '4.5'",
                            "max new tokens is not a whole number: ''"), errors)
        val (range, rangeErrors) = SamplerSettings.parse("3", "1", "0.5", "10")
        assertNull(range)
        assertEquals(listOf("temperature must be between 0 and 2 (0 is greedy), got 3.0"), rangeErrors)
    }

    @Test
    fun tokensPerSecondFromAnInjectedClock() {
        var now = 0L
        val s = TokenStats { now }
        s.begin()
        assertNull(s.timeToFirstToken)
        assertEquals("no tokens yet", s.summary())
        now = 500_000_000L; s.token()              // first token after 0.5 s
        assertNull(s.decodeTokensPerSecond)
        repeat(20) { now += 50_000_000L; s.token() } // 20 more, one every 50 ms
        assertEquals(0.5, s.timeToFirstToken)
        assertEquals(20.0, s.decodeTokensPerSecond!!, 1e-9)
        assertEquals("21 tokens, first after 0.50 s, 20.0 tok/s", s.summary())
    }
}
