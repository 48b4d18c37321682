package dev.gemmaaot.chat

import android.app.ActivityManager
import android.app.Application
import android.content.Context
import androidx.lifecycle.AndroidViewModel
import androidx.lifecycle.viewModelScope
import dev.gemmaaot.core.ChatSession
import dev.gemmaaot.core.ChatState
import dev.gemmaaot.core.LitertlmFile
import dev.gemmaaot.core.ModelLocator
import dev.gemmaaot.core.SamplerSettings
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asStateFlow
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext
import java.io.File

/** What the app shows, one screen per state. */
sealed interface Screen {
    data object Searching : Screen
    data class NoModel(val folder: String, val adbCommand: String) : Screen
    data class BadModel(val file: String, val reason: String) : Screen
    data class OutOfMemory(val file: String, val needMb: Long, val availableMb: Long) : Screen
    data class Loading(val file: String, val sizeMb: Long) : Screen
    data class Chat(val model: String, val backend: String) : Screen
}

class ChatViewModel(app: Application) : AndroidViewModel(app) {
    private val modelDir: File = app.getExternalFilesDir(null) ?: app.filesDir
    private val _screen = MutableStateFlow<Screen>(Screen.Searching)
    val screen: StateFlow<Screen> = _screen.asStateFlow()

    private val _chat = MutableStateFlow(ChatState())
    val chat: StateFlow<ChatState> = _chat.asStateFlow()
    private val session = ChatSession(listener = { _chat.value = it })

    private val _settings = MutableStateFlow(SamplerSettings())
    val settings: StateFlow<SamplerSettings> = _settings.asStateFlow()
    private val _useGpu = MutableStateFlow(false)
    val useGpu: StateFlow<Boolean> = _useGpu.asStateFlow()

    private var engine: LlmEngine? = null

    init { findAndLoad() }

    fun findAndLoad() {
        _screen.value = Screen.Searching
        viewModelScope.launch {
            val found = withContext(Dispatchers.IO) { ModelLocator.find(listOf(modelDir)) }
            when (found) {
                is ModelLocator.Found.NoModel -> _screen.value = Screen.NoModel(
                    modelDir.absolutePath, ModelLocator.pushCommand(modelDir.absolutePath))
                is ModelLocator.Found.Model -> when (val check = found.check) {
                    is LitertlmFile.Check.Invalid -> _screen.value = Screen.BadModel(found.file.name, check.reason)
                    is LitertlmFile.Check.Ok -> load(found.file, check)
                }
            }
        }
    }

    private suspend fun load(file: File, check: LitertlmFile.Check.Ok) {
        val needMb = check.bytes * 3 / 2 / (1 shl 20)      // weights mapped plus KV cache and buffers
        val availableMb = availableMemoryMb()
        if (needMb > availableMb) {
            _screen.value = Screen.OutOfMemory(file.name, needMb, availableMb)
            return
        }
        _screen.value = Screen.Loading(file.name, check.bytes / (1 shl 20))
        engine?.close()
        engine = null
        try {
            val opened = withContext(Dispatchers.IO) {
                LlmEngine.open(file, _useGpu.value, getApplication<Application>().cacheDir)
            }
            engine = opened
            _screen.value = Screen.Chat(file.name, opened.backendName)
        } catch (e: OutOfMemoryError) {
            _screen.value = Screen.OutOfMemory(file.name, needMb, availableMemoryMb())
        } catch (e: Exception) {
            _screen.value = Screen.BadModel(file.name, "LiteRT-LM could not load it: ${e.message}")
        }
    }

    private fun availableMemoryMb(): Long {
        val am = getApplication<Application>().getSystemService(Context.ACTIVITY_SERVICE) as ActivityManager
        val info = ActivityManager.MemoryInfo().also { am.getMemoryInfo(it) }
        return info.availMem / (1 shl 20)
    }

    fun send(text: String) {
        val e = engine ?: return
        val turn = try { session.send(text) } catch (ex: IllegalArgumentException) { return } catch (ex: IllegalStateException) { return }
        e.generate(turn, _settings.value, object : LlmEngine.Listener {
            override fun onPiece(text: String) { if (session.onPiece(turn.id, text)) e.cancel() }
            override fun onDone() = session.onDone(turn.id)
            override fun onError(message: String) = session.onError(turn.id, message)
        })
    }

    fun stop() {
        session.stop()
        engine?.cancel()
    }

    fun newChat() {
        engine?.cancel()
        session.newChat()
    }

    /** Returns the problems to show; empty when the settings were applied. */
    fun applySettings(temperature: String, topK: String, topP: String, maxNewTokens: String, gpu: Boolean): List<String> {
        val (parsed, problems) = SamplerSettings.parse(temperature, topK, topP, maxNewTokens)
        if (parsed == null) return problems
        _settings.value = parsed
        session.maxNewTokens = parsed.maxNewTokens
        if (gpu != _useGpu.value) {
            _useGpu.value = gpu
            stop()
            findAndLoad()
        }
        return emptyList()
    }

    override fun onCleared() {
        engine?.close()
        engine = null
    }
}
