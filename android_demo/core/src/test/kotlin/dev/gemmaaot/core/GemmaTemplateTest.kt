package dev.gemmaaot.core

import java.io.File
import kotlin.test.Test
import kotlin.test.assertEquals
import kotlin.test.assertFailsWith
import kotlin.test.assertTrue

/** The golden file is written by tests/test_android_demo.py from the Python runtime's
 *  render_chat: both implementations are checked against the same cases. */
class GemmaTemplateTest {
    private val golden: List<Map<String, Any?>> by lazy {
        val path = System.getProperty("golden") ?: error("run with -Dgolden=PATH")
        @Suppress("UNCHECKED_CAST")
        MiniJson(File(path).readText()).parse() as List<Map<String, Any?>>
    }

    private fun messages(case: Map<String, Any?>) = (case["messages"] as List<*>).map {
        val m = it as Map<*, *>
        ChatMessage(Role.fromWire(m["role"] as String), m["content"] as String)
    }

    @Test
    fun everyGoldenPromptIsRenderedExactly() {
        val ok = golden.filter { it["prompt"] != null }
        assertTrue(ok.size >= 8, "golden file has ${ok.size} prompt cases")
        for (case in ok) assertEquals(case["prompt"], GemmaTemplate.render(messages(case)), "case ${case["name"]}")
    }

    @Test
    fun everyGoldenErrorHasThePythonMessage() {
        val bad = golden.filter { it["error"] != null }
        assertTrue(bad.isNotEmpty())
        for (case in bad) {
            val e = assertFailsWith<IllegalArgumentException>("case ${case["name"]}") {
                GemmaTemplate.render(messages(case))
            }
            assertEquals(case["error"], e.message, "case ${case["name"]}")
        }
    }

    @Test
    fun sessionInputIsWhatTheEngineWrapsBackIntoThePrompt() {
        for (case in golden.filter { it["prompt"] != null }) {
            val input = GemmaTemplate.sessionInput(messages(case))
            assertEquals(case["prompt"], GemmaTemplate.BOS + GemmaTemplate.USER_PREFIX + input +
                GemmaTemplate.USER_SUFFIX + GemmaTemplate.MODEL_PREFIX, "case ${case["name"]}")
        }
        assertEquals("Hi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n<start_of_turn>user\nAnd?",
            GemmaTemplate.sessionInput(listOf(ChatMessage(Role.USER, "Hi"), ChatMessage(Role.MODEL, "Yo"),
                                              ChatMessage(Role.USER, "And?"))))
    }

    @Test
    fun constantsAreThePythonTemplates() {
        val c = golden.single { it["constants"] != null }["constants"] as Map<*, *>
        assertEquals(c["bos"], GemmaTemplate.BOS)
        assertEquals(c["start_of_turn"], GemmaTemplate.START_OF_TURN)
        assertEquals(c["end_of_turn"], GemmaTemplate.END_OF_TURN)
        assertEquals(c["user_prefix"], GemmaTemplate.USER_PREFIX)
        assertEquals(c["model_prefix"], GemmaTemplate.MODEL_PREFIX)
        assertEquals(c["turn_suffix"], GemmaTemplate.USER_SUFFIX)
    }

    @Test
    fun unknownRoleIsRefused() {
        val e = assertFailsWith<IllegalArgumentException> { Role.fromWire("tool") }
        assertEquals("unknown chat role 'tool'; use system, user or assistant", e.message)
    }

    @Test
    fun pythonWhitespaceRules() {
        assertEquals("x", GemmaTemplate.pyStrip("\u001c\u0085\u3000x\u00a0\u2028"))
        assertEquals("\u200bx", GemmaTemplate.pyStrip("\u200bx"))     // zero-width space is not space
    }
}
