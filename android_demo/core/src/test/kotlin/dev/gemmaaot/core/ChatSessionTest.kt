package dev.gemmaaot.core

import kotlin.test.Test
import kotlin.test.assertEquals
import kotlin.test.assertFailsWith
import kotlin.test.assertFalse
import kotlin.test.assertNull
import kotlin.test.assertTrue

class ChatSessionTest {
    private var now = 0L
    private val seen = ArrayList<ChatState>()
    private fun session(system: String? = null) = ChatSession(system, clock = { now }) { seen += it }

    @Test
    fun aTurnStreamsAndLandsInTheHistory() {
        val chat = session("Be brief.")
        val (id, prompt) = chat.send("  Hi there ")
        assertEquals("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n" +
                     "<start_of_turn>model\n", prompt)
        assertTrue(chat.state.generating)
        now = 100_000_000; chat.onPiece(id, "Hel")
        now = 200_000_000; chat.onPiece(id, "lo!")
        assertEquals("Hello!", chat.state.streaming)
        chat.onDone(id)
        assertEquals(listOf(ChatMessage(Role.USER, "  Hi there "), ChatMessage(Role.MODEL, "Hello!")),
                     chat.state.messages)
        assertFalse(chat.state.generating)
        assertEquals("2 tokens, first after 0.10 s, 10.0 tok/s", chat.state.lastStats)
        val (_, second) = chat.send("And?")
        assertEquals(prompt + "Hello!<end_of_turn>\n<start_of_turn>user\nAnd?<end_of_turn>\n" +
                     "<start_of_turn>model\n", second)
        assertTrue(seen.size >= 5)
    }

    @Test
    fun stopStringEndsTheReplyAndAsksTheEngineToStop() {
        val chat = session()
        val (id, _) = chat.send("Hi")
        assertFalse(chat.onPiece(id, "Yes<end_of"))
        assertTrue(chat.onPiece(id, "_turn>\n<start_of_turn>user"))
        assertEquals("Yes", chat.state.messages.last().content)
        assertFalse(chat.state.generating)
    }

    @Test
    fun maxNewTokensEndsTheReply() {
        val chat = session()
        chat.maxNewTokens = 3
        val (id, _) = chat.send("Count")
        assertFalse(chat.onPiece(id, "1"))
        assertFalse(chat.onPiece(id, " 2"))
        assertTrue(chat.onPiece(id, " 3"))
        assertEquals("1 2 3", chat.state.messages.last().content)
        assertFalse(chat.onPiece(id, " 4"))
        assertEquals("1 2 3", chat.state.messages.last().content)
    }

    @Test
    fun stopKeepsThePartialReplyAndLatePiecesAreIgnored() {
        val chat = session()
        val (id, _) = chat.send("Tell me a story")
        chat.onPiece(id, "Once upon")
        chat.stop()
        chat.onPiece(id, " a time")                  // the engine's callback after cancel
        chat.onDone(id)
        assertEquals("Once upon", chat.state.messages.last().content)
        assertEquals(2, chat.state.messages.size)
    }

    @Test
    fun newChatForgetsEverythingIncludingTheStreamInFlight() {
        val chat = session()
        val (id, _) = chat.send("Hi")
        chat.onPiece(id, "Hel")
        chat.newChat()
        chat.onPiece(id, "lo")
        chat.onDone(id)
        assertEquals(ChatState(), chat.state)
    }

    @Test
    fun anErrorBeforeAnyTextLetsTheTurnBeRetried() {
        val chat = session()
        val (id, _) = chat.send("Hi")
        chat.onError(id, "Maximum kv-cache size reached.")
        assertEquals(emptyList(), chat.state.messages)
        assertEquals("Maximum kv-cache size reached.", chat.state.error)
        val (id2, _) = chat.send("Hi")
        chat.onDone(id2)                             // an empty reply keeps roles alternating
        assertEquals(listOf(Role.USER, Role.MODEL), chat.state.messages.map { it.role })
        assertNull(chat.state.error)
    }

    @Test
    fun sendingIsRefusedWhileStreamingOrEmpty() {
        val chat = session()
        assertEquals("type a message first",
                     assertFailsWith<IllegalArgumentException> { chat.send(" \n") }.message)
        chat.send("Hi")
        assertEquals("wait for the reply, or stop it, before sending",
                     assertFailsWith<IllegalStateException> { chat.send("again") }.message)
    }
}
