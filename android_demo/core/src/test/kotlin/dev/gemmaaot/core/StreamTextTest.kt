package dev.gemmaaot.core

import kotlin.test.Test
import kotlin.test.assertEquals
import kotlin.test.assertFalse
import kotlin.test.assertTrue

class StreamTextTest {
    @Test
    fun multiByteCharacterSplitAcrossPieces() {
        val st = StreamText()
        val euro = "€".toByteArray()                       // E2 82 AC
        assertEquals("a", st.addBytes(byteArrayOf('a'.code.toByte(), euro[0])))
        assertEquals("", st.addBytes(byteArrayOf(euro[1])))
        assertEquals("€b", st.addBytes(byteArrayOf(euro[2], 'b'.code.toByte())))
        val emoji = "😀".toByteArray()                      // 4 bytes
        assertEquals("", st.addBytes(emoji.copyOfRange(0, 3)))
        assertEquals("😀", st.addBytes(emoji.copyOfRange(3, 4)))
        assertEquals("a€b😀", st.text)
    }

    @Test
    fun incompleteTailBecomesReplacementCharacterAtTheEnd() {
        val st = StreamText()
        st.addBytes(byteArrayOf('x'.code.toByte(), 0xE2.toByte(), 0x82.toByte()))
        assertEquals("x", st.text)
        assertEquals("\uFFFD", st.finish())
    }

    @Test
    fun textThatMayStartAStopStringWaits() {
        val st = StreamText(listOf("<end_of_turn>"))
        assertEquals("Hello", st.addText("Hello<end"))
        assertEquals("", st.addText("_of_"))
        assertFalse(st.stopped)
        assertEquals("Hello", st.text)
        assertEquals("<end_of_x", st.addText("x"))      // no longer a stop string's prefix
    }

    @Test
    fun stopStringEndsTheReply() {
        val st = StreamText(listOf("<end_of_turn>"))
        st.addText("Hello<end")
        st.addText("_of_")
        assertEquals("", st.addText("turn>\nmore"))
        assertTrue(st.stopped)
        assertEquals("Hello", st.text)
        assertEquals("", st.addText("ignored"))
        assertEquals("", st.finish())
    }

    @Test
    fun heldTextIsReleasedWhenItStopsLookingLikeAStopString() {
        val st = StreamText(listOf("\n\nUser:"))
        assertEquals("a", st.addText("a\n\nUs"))
        assertEquals("\n\nUse it", st.addText("e it"))
        assertEquals("x", st.addText("x"))
        assertEquals("a\n\nUse itx", st.text)
    }

    @Test
    fun utf8PrefixCounting() {
        assertEquals(0, StreamText.completeUtf8Prefix(byteArrayOf(0xF0.toByte(), 0x9F.toByte())))
        assertEquals(1, StreamText.completeUtf8Prefix(byteArrayOf('a'.code.toByte(), 0xC3.toByte())))
        assertEquals(2, StreamText.completeUtf8Prefix("é".toByteArray()))
        assertEquals(1, StreamText.completeUtf8Prefix(byteArrayOf(0x80.toByte())))  // stray byte
    }
}
